"""Tests for sgdnoise.data: IDX reader, data lookup, corrupted FashionMNIST, synthetic sets."""

from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgdnoise.data import (
    FASHION_MNIST_FILES,
    CorruptedFashionMNIST,
    DataNotFoundError,
    IDXFormatError,
    corrupted_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
    one_hidden_layer_data,
    read_idx,
    toy2d_data,
)
from sgdnoise.data import fashion as fashion_mod

# --------------------------------------------------------------------------------------------
# Helpers: write small IDX files
# --------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, *, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.tobytes()


def _write(path: Path, data: bytes, *, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _write_dataset(directory: Path, *, n_train: int = 30, n_test: int = 7, gz: bool = True):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    arrays["train_images"][0, 0, 0] = 0  # make sure both pixel extremes occur
    arrays["train_images"][0, 0, 1] = 255
    directory.mkdir(parents=True, exist_ok=True)
    for role, base in FASHION_MNIST_FILES.items():
        _write(directory / base, _idx_bytes(arrays[role]), gz=gz)
    return arrays


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    labels = np.array([3, 1, 9], dtype=np.uint8)
    p_img = _write(tmp_path / "img", _idx_bytes(images), gz=gz)
    p_lab = _write(tmp_path / "lab", _idx_bytes(labels), gz=gz)
    got_img = read_idx(p_img, expected_shape=(None, 28, 28))
    got_lab = read_idx(p_lab, expected_shape=(None,))
    assert got_img.dtype == np.uint8 and got_img.shape == (3, 28, 28)
    np.testing.assert_array_equal(got_img, images.astype(np.uint8))
    np.testing.assert_array_equal(got_lab, labels)


def test_read_idx_bad_magic(tmp_path):
    p = _write(tmp_path / "bad", _idx_bytes(np.zeros(4, np.uint8), magic=0x12340801), gz=False)
    with pytest.raises(IDXFormatError, match=r"bad IDX magic number 0x12340801"):
        read_idx(p)
    # A gzipped text file is also rejected by its magic, not by a numpy error.
    p2 = _write(tmp_path / "text", b"hello world, not idx", gz=True)
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(p2)


def test_read_idx_truncated_and_wrong_shape(tmp_path):
    data = _idx_bytes(np.zeros((2, 28, 28), np.uint8))
    p = _write(tmp_path / "trunc", data[:-5], gz=False)
    with pytest.raises(IDXFormatError, match="truncated or corrupt"):
        read_idx(p)
    p = _write(tmp_path / "labels", _idx_bytes(np.zeros(5, np.uint8)), gz=True)
    with pytest.raises(IDXFormatError, match=r"declares shape \(5,\).*expected"):
        read_idx(p, expected_shape=(None, 28, 28))


# --------------------------------------------------------------------------------------------
# Lookup and loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_data_dir(tmp_path, gz):
    arrays = _write_dataset(tmp_path / "d", gz=gz)
    ds = load_fashion_mnist(tmp_path / "d", dtype=torch.float64)
    assert ds.train_images.shape == (30, 1, 28, 28) and ds.train_images.dtype == torch.float64
    assert ds.test_images.shape == (7, 1, 28, 28)
    assert ds.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_images[:, 0].numpy(), arrays["test_images"])
    assert ds.source == tmp_path / "d"


def test_data_dir_missing_files_are_named(tmp_path):
    _write_dataset(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match=r"lacks the FashionMNIST file\(s\) t10k-labels"):
        find_fashion_mnist(tmp_path / "d")
    with pytest.raises(DataNotFoundError, match="not a directory"):
        find_fashion_mnist(tmp_path / "nowhere")


def test_missing_data_error_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mod, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(DataNotFoundError) as info:
        find_fashion_mnist()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "--data-dir DIR" in msg
    assert "pip install torchvision" in msg
    assert "torchvision is not installed" in msg
    for base in FASHION_MNIST_FILES.values():
        assert base in msg


def test_mismatched_counts(tmp_path):
    _write_dataset(tmp_path / "d")
    _write(
        tmp_path / "d" / "t10k-labels-idx1-ubyte",
        _idx_bytes(np.zeros(3, np.uint8)),
        gz=True,
    )
    with pytest.raises(IDXFormatError, match="must match"):
        load_fashion_mnist(tmp_path / "d")


def test_corrupted_on_small_files(tmp_path):
    arrays = _write_dataset(tmp_path / "d", n_train=30)
    ds = corrupted_fashion_mnist(n_train=20, n_clean=12, seed=3, data_dir=tmp_path / "d")
    assert isinstance(ds, CorruptedFashionMNIST)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert float(ds.x_train.min()) == -1.0 and float(ds.x_train.max()) == 1.0
    expected = (arrays["train_images"][:20].astype(np.float64) - 127.5) / 127.5
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds.y_train_original.numpy(), arrays["train_labels"][:20])
    assert torch.equal(ds.y_train[:12], ds.y_train_original[:12])
    assert ds.corrupted_mask.tolist() == [False] * 12 + [True] * 8
    expected_random = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ds.y_train[12:], expected_random)
    with pytest.raises(ValueError, match="exceeds the 30 training images"):
        corrupted_fashion_mnist(n_train=31, n_clean=0, data_dir=tmp_path / "d")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 0}, r"1 <= n_train <= 60000"),
        ({"n_train": 60001}, r"1 <= n_train <= 60000"),
        ({"n_train": 100, "n_clean": 101}, r"0 <= n_clean <= n_train=100"),
        ({"n_clean": -1}, r"0 <= n_clean"),
    ],
)
def test_corrupted_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        corrupted_fashion_mnist(**kwargs)


def test_corrupted_argument_types():
    with pytest.raises(TypeError, match="n_train must be an int"):
        corrupted_fashion_mnist(n_train=1200.0)
    with pytest.raises(TypeError, match="floating-point"):
        corrupted_fashion_mnist(dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# The real Debian data
# --------------------------------------------------------------------------------------------

_HAS_DEBIAN = all(
    (fashion_mod.DEBIAN_DIR / f"{b}.gz").is_file() or (fashion_mod.DEBIAN_DIR / b).is_file()
    for b in FASHION_MNIST_FILES.values()
)
needs_debian = pytest.mark.skipif(
    not _HAS_DEBIAN,
    reason=f"FashionMNIST not installed in {fashion_mod.DEBIAN_DIR} "
    "(apt-get install -y dataset-fashion-mnist)",
)


@needs_debian
def test_real_fashion_mnist():
    ds = corrupted_fashion_mnist()
    assert ds.source == fashion_mod.DEBIAN_DIR
    assert ds.x_train.shape == (1200, 1, 28, 28)
    assert ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == ds.y_train_original.shape == ds.corrupted_mask.shape == (1200,)
    assert ds.y_test.shape == (10000,)
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.corrupted_mask.dtype == torch.bool
    assert int(ds.corrupted_mask.sum()) == 200 and not bool(ds.corrupted_mask[:1000].any())
    assert bool(ds.corrupted_mask[1000:].all())
    assert torch.equal(ds.y_train[:1000], ds.y_train_original[:1000])
    changed = int((ds.y_train[1000:] != ds.y_train_original[1000:]).sum())
    assert 150 <= changed <= 199  # ~90 % of 200 change; ~10 % keep their label by chance
    for y in (ds.y_train, ds.y_test):
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(ds.y_test.tolist()) == set(range(10))
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0

    again = corrupted_fashion_mnist(seed=0)
    assert torch.equal(again.y_train, ds.y_train)
    other = corrupted_fashion_mnist(seed=1)
    assert not torch.equal(other.y_train, ds.y_train)
    assert torch.equal(other.y_train[:1000], ds.y_train[:1000])
    assert torch.equal(other.x_train, ds.x_train)


@needs_debian
def test_real_raw_loader():
    raw = load_fashion_mnist()
    assert raw.train_images.shape == (60000, 1, 28, 28)
    assert raw.test_labels.shape == (10000,)
    assert float(raw.train_images.max()) == 255.0
    assert torch.bincount(raw.train_labels).tolist() == [6000] * 10


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def test_toy2d_data_shape_determinism_and_covariance():
    x = toy2d_data(3, 50, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 50, 2) and x.dtype == torch.float64
    y = toy2d_data(3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, y)
    assert not torch.equal(x, toy2d_data(3, 50, generator=torch.Generator().manual_seed(2)))

    # Exact construction: same generator state, same z.
    z = torch.randn(3, 50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = math.cos(math.pi / 4)
    k = torch.tensor([[c, -c], [c, c]], dtype=torch.float64)
    expected = 1e-2 * (z * torch.tensor([math.sqrt(10.0), 1.0], dtype=torch.float64)) @ k
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=0)

    # Covariance: 1e-4 · (10 along (1,-1), 1 along (1,1)), i.e. 1e-4·[[5.5, -4.5], [-4.5, 5.5]].
    big = toy2d_data(1, 200_000, generator=torch.Generator().manual_seed(0))[0]
    cov = torch.cov(big.T)
    target = 1e-4 * torch.tensor([[5.5, -4.5], [-4.5, 5.5]], dtype=torch.float64)
    torch.testing.assert_close(cov, target, rtol=0, atol=1e-4 * 0.05)


def test_toy2d_data_validation():
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        toy2d_data(1, generator=0)
    with pytest.raises(ValueError, match="num_runs must be a positive int"):
        toy2d_data(0, generator=torch.Generator())


def test_one_hidden_layer_data():
    x, y = one_hidden_layer_data(1000, generator=torch.Generator().manual_seed(123))
    assert x.shape == (1000, 2) and y.shape == (1000,) and y.dtype == torch.float32
    assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0
    assert torch.equal(y, (x[:, 0] >= x[:, 1]).float())
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < float(y.mean()) < 0.6
    x2, y2 = one_hidden_layer_data(1000, generator=torch.Generator().manual_seed(123))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x64, _ = one_hidden_layer_data(5, generator=torch.Generator(), dtype=torch.float64)
    assert x64.dtype == torch.float64


def test_synthetic_does_not_touch_global_rng():
    state = torch.get_rng_state()
    toy2d_data(2, generator=torch.Generator().manual_seed(0))
    one_hidden_layer_data(10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
