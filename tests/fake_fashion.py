"""Small stand-in FashionMNIST files (random pixels) for tests that need no real data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from sgdnoise.data import FASHION_MNIST_FILES


def write_fashion(directory: Path, *, n_train: int = 80, n_test: int = 200, seed: int = 0):
    """Write the four gzipped IDX files into ``directory``; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for role, base in FASHION_MNIST_FILES.items():
        arr = arrays[role]
        header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(
            int(n).to_bytes(4, "big") for n in arr.shape
        )
        (directory / f"{base}.gz").write_bytes(gzip.compress(header + arr.tobytes(), mtime=0))
    return directory
