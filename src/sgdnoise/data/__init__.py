"""Data sets of the paper: FashionMNIST with corrupted labels and the synthetic tasks."""

from __future__ import annotations

from sgdnoise.data.fashion import (
    DEBIAN_DIR,
    FASHION_MNIST_FILES,
    CorruptedFashionMNIST,
    DataNotFoundError,
    FashionMNIST,
    IDXFormatError,
    corrupted_fashion_mnist,
    fashion_mnist_identity,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    scale_pixels,
)
from sgdnoise.data.synthetic import TOY2D_ROTATION, one_hidden_layer_data, toy2d_data

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "TOY2D_ROTATION",
    "CorruptedFashionMNIST",
    "DataNotFoundError",
    "FashionMNIST",
    "IDXFormatError",
    "corrupted_fashion_mnist",
    "fashion_mnist_identity",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "one_hidden_layer_data",
    "read_idx",
    "scale_pixels",
    "toy2d_data",
]
