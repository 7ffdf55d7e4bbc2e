"""FashionMNIST: an IDX reader, a data locator, and the paper's corrupted-label training set.

The paper (Zhu et al., 2019, Sec. 5.3 / App. D.3) trains a small CNN on **1,200** FashionMNIST
training images: the first 1,000 keep their labels and the next 200 get uniformly random labels
(the released ``mnist2np.py`` draws ``np.random.choice(10, 200)``, so about 10 % of the "corrupted"
labels equal the true one by chance). Pixels are scaled as ``(x - 127.5) / 127.5`` into ``[-1, 1]``
and evaluation uses all 10,000 test images.

Where the data come from (first hit wins):

1. ``data_dir`` passed explicitly: a directory holding the four IDX files (gzipped or plain).
2. Debian's package directory :data:`DEBIAN_DIR` (``apt-get install -y dataset-fashion-mnist``).
3. A previous torchvision download in the cache directory (``$XDG_CACHE_HOME/sgdnoise`` or
   ``~/.cache/sgdnoise``), else a fresh torchvision download there **only** if torchvision is
   importable (it is an optional dependency; we only use it as a downloader).
4. Otherwise :class:`DataNotFoundError` explains the three ways to get the files.

The IDX format (LeCun's MNIST format) is a big-endian header ``0x00 0x00 <dtype> <ndim>``, then
``ndim`` big-endian ``uint32`` sizes, then the row-major payload. FashionMNIST uses dtype
``0x08`` (unsigned byte): magic ``0x00000803`` for ``[n, 28, 28]`` images and ``0x00000801`` for
``[n]`` labels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "CorruptedFashionMNIST",
    "DataNotFoundError",
    "FashionMNIST",
    "IDXFormatError",
    "corrupted_fashion_mnist",
    "fashion_mnist_identity",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "scale_pixels",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the four gzipped IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Base names of the four IDX files (each may also carry a ``.gz`` suffix).
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Expected shape per file. The sample count is free (``None``) so that small stand-in files work
# in tests; it must agree between images and labels. The real files hold 60,000 and 10,000.
_EXPECTED: dict[str, tuple[int | None, ...]] = {
    "train_images": (None, 28, 28),
    "train_labels": (None,),
    "test_images": (None, 28, 28),
    "test_labels": (None,),
}

_NUM_TRAIN = 60000
_NUM_CLASSES = 10

# IDX dtype codes (third magic byte). FashionMNIST only uses 0x08, but the reader handles all.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """The FashionMNIST IDX files could not be found (the message says how to get them)."""


class IDXFormatError(ValueError):
    """A file is not a valid IDX file, or its header does not match the expected content."""


def _how_to_get_data() -> str:
    names = ", ".join(f"{base}.gz" for base in FASHION_MNIST_FILES.values())
    return (
        "To get FashionMNIST, do one of:\n"
        f"  (a) as root: apt-get update && apt-get install -y dataset-fashion-mnist "
        f"(installs {DEBIAN_DIR}/);\n"
        f"  (b) pass --data-dir DIR (or data_dir=DIR) where DIR holds the four IDX files "
        f"{names} (gzipped or not, e.g. from https://github.com/zalandoresearch/fashion-mnist);\n"
        "  (c) on a machine with internet access: pip install torchvision, and sgdnoise will "
        f"download the files into {_cache_dir()}."
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sgdnoise"


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    # Decide by content, not by name: gzip files start with 0x1f 0x8b, IDX files with 0x00 0x00.
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IDXFormatError(
                f"{path}: looks gzipped but could not be decompressed ({err}). The file is "
                "probably truncated or corrupt; download it again."
            ) from err
    return raw


def read_idx(path: str | os.PathLike[str], *, expected_shape: tuple[int | None, ...] | None = None):
    """Read one IDX file (gzipped or plain) into a read-only numpy array.

    Args:
        path: the file. Gzip is detected from the file's first two bytes, not its name.
        expected_shape: if given, the header must declare exactly this shape (``None`` entries
            match any size). FashionMNIST images are ``(n, 28, 28)`` and labels ``(n,)``.

    Returns:
        ``np.ndarray`` with the declared shape and the native-endian version of the declared
        dtype (``uint8`` for FashionMNIST). It is a view on the decompressed bytes (no copy).

    Raises:
        IDXFormatError: bad magic number, unknown dtype code, wrong shape, or a payload whose
            length differs from the header's product of sizes.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: only {len(data)} bytes; an IDX file needs a 4-byte magic.")
    magic = int.from_bytes(data[:4], "big")
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{magic:08x}. Expected 0x000008NN (unsigned bytes with "
            "NN dimensions), e.g. 0x00000803 for images and 0x00000801 for labels. Is this really "
            "an IDX file (train-images-idx3-ubyte etc.)?"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{path}: header declares {ndim} dimensions but the file has only {len(data)} bytes."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if expected_shape is not None:
        ok = len(shape) == len(expected_shape) and all(
            e is None or e == s for e, s in zip(expected_shape, shape, strict=False)
        )
        if not ok:
            want = tuple("any" if e is None else e for e in expected_shape)
            raise IDXFormatError(
                f"{path}: header declares shape {shape} (magic 0x{magic:08x}) but {want} was "
                "expected. Check that the file names match their contents (images vs labels, "
                "train vs t10k)."
            )
    dtype = _IDX_DTYPES[code]
    expected_len = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_len:
        raise IDXFormatError(
            f"{path}: header declares shape {shape} ({expected_len} bytes in all) but the file has "
            f"{len(data)} bytes. The file is truncated or corrupt; download it again."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


# --------------------------------------------------------------------------------------------
# Locating the files
# --------------------------------------------------------------------------------------------


def _files_in(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each of the four roles to an existing file in ``directory`` (plain name or ``.gz``)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, base in FASHION_MNIST_FILES.items():
        for name in (f"{base}.gz", base):
            if (directory / name).is_file():
                found[role] = directory / name
                break
        else:
            missing.append(f"{base}[.gz]")
    return found, missing


def _torchvision_download(cache: Path) -> Path:
    """Download via torchvision into ``cache`` and return the folder with the raw IDX files."""
    import torchvision  # noqa: F401  (optional dependency; ImportError handled by the caller)
    from torchvision.datasets import FashionMNIST as _TVFashionMNIST

    cache.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        _TVFashionMNIST(root=str(cache), train=train, download=True)
    return cache / "FashionMNIST" / "raw"


def find_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Locate the four FashionMNIST IDX files (see the module docstring for the lookup order).

    Args:
        data_dir: a directory holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``. If given, no other place is searched.

    Returns:
        ``{"train_images": path, "train_labels": path, "test_images": path, "test_labels": path}``.

    Raises:
        DataNotFoundError: ``data_dir`` is given but lacks some files (they are named), or no
            source worked (the message says how to get the data).
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise DataNotFoundError(
                f"data_dir {str(directory)!r} is not a directory. It must hold the four "
                f"FashionMNIST IDX files.\n{_how_to_get_data()}"
            )
        found, missing = _files_in(directory)
        if missing:
            raise DataNotFoundError(
                f"data_dir {str(directory)!r} lacks the FashionMNIST file(s) {', '.join(missing)} "
                f"(gzipped or plain).\n{_how_to_get_data()}"
            )
        return found

    tv_raw = _cache_dir() / "FashionMNIST" / "raw"
    for directory in (DEBIAN_DIR, tv_raw):
        found, missing = _files_in(directory)
        if not missing:
            return found

    tried = [f"{DEBIAN_DIR} (Debian package)", f"{tv_raw} (torchvision cache)"]
    try:
        raw = _torchvision_download(_cache_dir())
    except ImportError:
        tried.append("torchvision download (torchvision is not installed)")
    except Exception as err:  # network errors, HTTP errors, disk errors: all mean "no data"
        tried.append(f"torchvision download (failed: {type(err).__name__}: {err})")
    else:
        found, missing = _files_in(raw)
        if not missing:
            return found
        tried.append(f"torchvision download into {raw} (still missing {', '.join(missing)})")
    raise DataNotFoundError(
        "FashionMNIST not found. Tried: " + "; ".join(tried) + ".\n" + _how_to_get_data()
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FashionMNIST:
    """The full FashionMNIST data set with unscaled pixels.

    Attributes:
        train_images: ``[60000, 1, 28, 28]`` (for the real files) pixel values in ``0..255``, as
            the requested dtype.
        train_labels: ``[60000]`` int64 class indices in ``0..9``.
        test_images: ``[10000, 1, 28, 28]`` pixel values in ``0..255``.
        test_labels: ``[10000]`` int64.
        source: the directory the files were read from.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path


@functools.lru_cache(maxsize=4)
def _load_arrays(key: tuple[tuple[str, str, int, int], ...]) -> dict[str, np.ndarray]:
    """Parse and validate the four files once per process (``key``: role, path, size, mtime)."""
    paths = {role: path for role, path, _, _ in key}
    arrays = {role: read_idx(path, expected_shape=_EXPECTED[role]) for role, path in paths.items()}
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        n_img, n_lab = arrays[f"{split}_images"].shape[0], labels.shape[0]
        if n_img != n_lab:
            raise IDXFormatError(
                f"{paths[f'{split}_images']} holds {n_img} images but "
                f"{paths[f'{split}_labels']} holds {n_lab} labels; they must match. Are the files "
                "from the same data set and release?"
            )
        if labels.size and int(labels.max()) >= _NUM_CLASSES:
            raise IDXFormatError(
                f"{paths[f'{split}_labels']}: labels must lie in 0..9, found {labels.max()}."
            )
    for arr in arrays.values():
        arr.flags.writeable = False  # shared by every caller of the cache
    return arrays


def _load(data_dir: str | os.PathLike[str] | None) -> tuple[dict[str, np.ndarray], Path]:
    files = find_fashion_mnist(data_dir)
    # Key the cache by path *and* (size, mtime) so that a file replaced on disk is re-read.
    key = tuple(
        (
            role,
            str(files[role].resolve()),
            files[role].stat().st_size,
            files[role].stat().st_mtime_ns,
        )
        for role in FASHION_MNIST_FILES
    )
    return _load_arrays(key), files["train_images"].parent


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes (cached per process by path, size and modification time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fashion_mnist_identity(data_dir: str | os.PathLike[str] | None = None) -> dict[str, object]:
    """The identity of the FashionMNIST files that ``data_dir`` resolves to.

    Returns ``{"source": folder, "files": {role: {"name", "bytes", "sha256"}}, "num_train",
    "num_test"}``: two folders holding the same bytes have the same ``files`` entry, so a run can
    tell whether it is being resumed on the data it started with (the folder itself may move).

    Raises:
        DataNotFoundError, IDXFormatError: as :func:`load_fashion_mnist`.
    """
    files = find_fashion_mnist(data_dir)
    arrays, source = _load(data_dir)
    ident: dict[str, object] = {"source": str(source), "files": {}}
    for role in FASHION_MNIST_FILES:
        st = files[role].stat()
        ident["files"][role] = {  # type: ignore[index]
            "name": files[role].name,
            "bytes": st.st_size,
            "sha256": _sha256(str(files[role].resolve()), st.st_size, st.st_mtime_ns),
        }
    ident["num_train"] = int(arrays["train_labels"].shape[0])
    ident["num_test"] = int(arrays["test_labels"].shape[0])
    return ident


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}."
        )


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    # Copy: the cached arrays are read-only and torch.from_numpy would warn on them.
    return torch.from_numpy(np.array(arr, copy=True))


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32
) -> FashionMNIST:
    """Load all of FashionMNIST as tensors with raw (unscaled, ``0..255``) pixel values.

    Parsing uses ``np.frombuffer`` and is cached per process, so repeated calls are cheap.

    Args:
        data_dir: directory with the four IDX files; ``None`` searches the default places
            (see the module docstring).
        dtype: floating dtype of the image tensors.

    Returns:
        A :class:`FashionMNIST` with images ``[n, 1, 28, 28]`` (NCHW) and int64 labels.

    Raises:
        DataNotFoundError: the files could not be found.
        IDXFormatError: a file is malformed.
    """
    _check_float_dtype(dtype)
    arrays, source = _load(data_dir)
    return FashionMNIST(
        train_images=_to_tensor(arrays["train_images"]).to(dtype).unsqueeze(1),
        train_labels=_to_tensor(arrays["train_labels"]).long(),
        test_images=_to_tensor(arrays["test_images"]).to(dtype).unsqueeze(1),
        test_labels=_to_tensor(arrays["test_labels"]).long(),
        source=source,
    )


def scale_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map pixels ``0..255`` to ``[-1, 1]`` as the paper's code does: ``(x - 127.5) / 127.5``."""
    return (x - 127.5) / 127.5


# --------------------------------------------------------------------------------------------
# The paper's corrupted training set
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptedFashionMNIST:
    """FashionMNIST subset with randomised labels (Zhu et al. 2019, Sec. 5.3).

    Attributes:
        x_train: ``[n_train, 1, 28, 28]`` scaled pixels ``(x - 127.5) / 127.5`` in ``[-1, 1]``;
            these are the first ``n_train`` training images in file order.
        y_train: ``[n_train]`` int64 training labels, random for the corrupted indices.
        corrupted_mask: ``[n_train]`` bool, True exactly for indices ``n_clean .. n_train - 1``
            (including the ~10 % whose random label happens to equal the true one).
        y_train_original: ``[n_train]`` int64 true labels.
        x_test: ``[10000, 1, 28, 28]`` scaled test images.
        y_test: ``[10000]`` int64 test labels.
        source: directory the IDX files were read from.
        seed: the seed of the label corruption.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    corrupted_mask: torch.Tensor
    y_train_original: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: Path
    seed: int

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_corrupted(self) -> int:
        return int(self.corrupted_mask.sum())


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    return int(value)


def corrupted_fashion_mnist(
    *,
    n_train: int = 1200,
    n_clean: int = 1000,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> CorruptedFashionMNIST:
    """The paper's FashionMNIST training set: ``n_clean`` true labels + random ones after them.

    Takes training images ``0 .. n_train - 1``; the labels of ``n_clean .. n_train - 1`` are
    replaced by ``torch.randint(0, 10, ...)`` drawn from ``torch.Generator().manual_seed(seed)``
    (uniform over the 10 classes, as ``np.random.choice(10, 200)`` in the released code), so about
    10 % of them keep the true label by chance. The default 1,200 = 1,000 + 200 is the paper's
    setting (the released script used 6,000 images with the same 200 corrupted; pass
    ``n_train=6000`` for that).

    Args:
        n_train: number of training images, ``1 <= n_train <= 60000``.
        n_clean: number of leading images whose labels stay correct, ``0 <= n_clean <= n_train``.
        seed: seed of the CPU generator used for the random labels.
        data_dir: directory with the IDX files (see :func:`find_fashion_mnist`).
        dtype: floating dtype of the images.
        device: where the returned tensors live.

    Returns:
        A frozen :class:`CorruptedFashionMNIST`.
    """
    n_train = _check_int(n_train, "n_train")
    n_clean = _check_int(n_clean, "n_clean")
    seed = _check_int(seed, "seed")
    if not 1 <= n_train <= _NUM_TRAIN:
        raise ValueError(
            f"n_train must satisfy 1 <= n_train <= {_NUM_TRAIN} (FashionMNIST has {_NUM_TRAIN} "
            f"training images), got n_train={n_train}. The paper uses n_train=1200."
        )
    if not 0 <= n_clean <= n_train:
        raise ValueError(
            f"n_clean must satisfy 0 <= n_clean <= n_train={n_train}, got n_clean={n_clean}. "
            "The paper uses n_clean=1000 with n_train=1200 (200 corrupted labels)."
        )
    _check_float_dtype(dtype)

    arrays, source = _load(data_dir)
    n_available = arrays["train_labels"].shape[0]
    if n_train > n_available:
        raise ValueError(
            f"n_train={n_train} exceeds the {n_available} training images found in {source}."
        )
    # Convert only the slice we need (the full float training set would be ~190 MB).
    x_train = scale_pixels(_to_tensor(arrays["train_images"][:n_train]).to(dtype).unsqueeze(1))
    x_test = scale_pixels(_to_tensor(arrays["test_images"]).to(dtype).unsqueeze(1))
    y_orig = _to_tensor(arrays["train_labels"][:n_train]).long()
    n_bad = n_train - n_clean
    generator = torch.Generator().manual_seed(seed)
    random_labels = torch.randint(0, _NUM_CLASSES, (n_bad,), generator=generator)
    y = y_orig.clone()
    y[n_clean:] = random_labels
    mask = torch.zeros(n_train, dtype=torch.bool)
    mask[n_clean:] = True
    return CorruptedFashionMNIST(
        x_train=x_train.to(device),
        y_train=y.to(device),
        corrupted_mask=mask.to(device),
        y_train_original=y_orig.to(device),
        x_test=x_test.to(device),
        y_test=_to_tensor(arrays["test_labels"]).long().to(device),
        source=source,
        seed=seed,
    )
