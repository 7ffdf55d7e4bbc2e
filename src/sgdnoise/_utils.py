"""Small shared helpers: explicit randomness, input validation, atomic file writes.

Randomness policy: every stochastic function takes a ``torch.Generator`` (or an ``int`` seed) as a
keyword argument. Numbers are always drawn on the generator's own device and then moved to the
target device, so a CPU generator gives the same numbers whether the computation runs on CPU or
CUDA, and nothing ever touches PyTorch's global RNG.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OutputError",
    "as_generator",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_finite",
    "prepare_out_dir",
    "rademacher",
    "randn",
    "sweep_temp",
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


def resolve_generator(
    seed: int | None = 0, generator: torch.Generator | int | None = None
) -> torch.Generator:
    """The package's one randomness rule: ``generator`` wins (an int there is a seed, for older
    code); otherwise a fresh CPU generator seeded with ``seed`` (``None`` counts as 0), so every
    function is deterministic by default.

    Raises:
        TypeError: ``generator`` or ``seed`` of another type.
    """
    if generator is not None:
        return as_generator(generator)
    return as_generator(0 if seed is None else seed, what="seed")


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


class OutputError(OSError):
    """A file or folder of the results could not be written; the message says which and why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


_HINTS = {
    errno.ENOSPC: "the disk is full; free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another --out",
    errno.EACCES: "permission denied; choose a writable --out",
    errno.EPERM: "permission denied; choose a writable --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --out",
    errno.EISDIR: "a folder is in the way; choose another --out",
}


def _output_error(path: Path, exc: OSError, action: str = "write") -> OutputError:
    why = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
    err = OutputError(exc.errno or 0, f"cannot {action} {str(path)!r}: {why}")
    err.filename = str(path)
    return err


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder ``path`` (and its parents), or raise one clear ``OutputError``.

    Refuses a path that is a file, lies under a file, or is not writable, before any work starts.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(
            errno.ENOTDIR,
            f"output folder {str(path)!r} is a file, not a folder; pass a folder path "
            "(it is created if missing)",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a parent is a file
        raise _output_error(path, OSError(errno.ENOTDIR, str(exc)), "create") from exc
    except OSError as exc:
        raise _output_error(path, exc, "create") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise _output_error(path, OSError(errno.EACCES, "not writable"))
    return path


_TMP_RE = re.compile(r"^\..+\.(\d+)-\d+\.tmp$")
_tmp_counter = itertools.count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def sweep_temp(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files under ``folder`` left by writers that were killed mid-write.

    Temporary files are named ``.<name>.<pid>-<n>.tmp`` by :func:`atomic_write_bytes`; a file is
    removed only when process ``pid`` no longer runs (so a concurrent writer is never disturbed).
    Returns the removed paths.
    """
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        m = _TMP_RE.match(tmp.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def is_writer() -> bool:
    """Whether this process writes files: always, except on the ranks other than 0 of an
    initialised ``torch.distributed`` group (``torchrun``), where rank 0 alone writes run
    directories, checkpoints and progress bars."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def refuse_torchrun(command: str, why: str) -> None:
    """Raise a one-line error when run under ``torchrun`` with more than one rank: ``command``
    runs in one process only (``why``).

    Raises:
        ValueError: ``WORLD_SIZE`` > 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"{command} runs in one process ({why}), but this is rank "
            f"{os.environ.get('RANK', '?')} of {world} under torchrun; run it without torchrun "
            "(under torchrun: `sgdnoise fashion`, or a script of your own that passes each rank "
            "its shard to sgdnoise.Problem; README, 'Scale out')"
        )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A reader (or a run killed mid-write) therefore sees either the old file or the complete new
    one, never a half-written file. The file gets the usual mode ``0o666`` less the process's
    umask (e.g. ``0o644`` under umask 022), as any file made by ``open``. The temporary file is
    removed on any error; one left by a killed process is removed by :func:`sweep_temp`.

    Raises:
        OutputError: the folder or the file cannot be written (full disk, permissions, ...).
    """
    if not is_writer():  # under torchrun, rank 0 alone writes
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(path.parent, exc, "create") from exc
    tmp = None
    try:
        while True:
            tmp = path.parent / f".{path.name}.{os.getpid()}-{next(_tmp_counter)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            break
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _output_error(path, exc) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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
