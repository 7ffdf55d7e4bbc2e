"""Small shared helpers: explicit randomness, input validation, atomic file writes.

Randomness policy: every stochastic function takes a ``torch.Generator`` (or an ``int`` seed) as a
keyword argument. Numbers are always drawn on the generator's own device and then moved to the
target device, so a CPU generator gives the same numbers whether the computation runs on CPU or
CUDA, and nothing ever touches PyTorch's global RNG.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "as_generator",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_finite",
    "rademacher",
    "randn",
]


def as_generator(
    generator: torch.Generator | int | None, *, what: str = "generator"
) -> torch.Generator:
    """Return a ``torch.Generator`` from a generator or an integer seed.

    Args:
        generator: an existing generator (returned as is, so its state advances) or an int seed
            (a fresh CPU generator seeded with it).
        what: the argument's name, used in the error message.

    Raises:
        TypeError: if ``generator`` is ``None`` or of another type. Randomness must be explicit.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(
        f"{what} must be a torch.Generator or an int seed, got {type(generator).__name__}. "
        f"Pass e.g. {what}=torch.Generator().manual_seed(0) or {what}=0; sgdnoise never draws "
        "from PyTorch's global random state."
    )


def randn(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Standard normal draws made on ``generator``'s device, then moved to ``device``."""
    out = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return out.to(device)


def rademacher(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Independent ±1 draws with equal probability (on ``generator``'s device, then moved)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (bits.to(dtype) * 2 - 1).to(device)


def check_finite(value: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise ``FloatingPointError`` naming ``what`` if ``value`` holds NaN or inf.

    Large tensors are screened by their sum (one cheap pass: any NaN/inf makes it non-finite);
    only when the sum is not finite (or could have overflowed) is every entry checked.
    """
    if value.numel() > 4096 and value.is_floating_point():
        if bool(torch.isfinite(value.sum())):
            return
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise FloatingPointError(
            f"{what}: not finite ({bad} of {value.numel()} entries are NaN or inf). "
            + (
                hint
                or "Check the model's parameters and inputs for NaN/inf, or lower the learning rate."
            )
        )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A reader (or a run killed mid-write) therefore sees either the old file or the complete new
    one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a UTF-8 text file (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (tensors and numpy values become lists/floats)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
