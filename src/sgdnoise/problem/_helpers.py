"""Helpers of :class:`~sgdnoise.problem.Problem`: parameter selection, memory sizes, tolerances,
batch slicing and the math-attention context (no state)."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from .. import _data

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ParamSpec = nn.Module | str | torch.Tensor | Sequence[nn.Module | str | torch.Tensor]


def _select_parameters(
    model: nn.Module, named: list[tuple[str, torch.Tensor]], spec: ParamSpec
) -> list[tuple[str, torch.Tensor]]:
    """The trainable ``(name, parameter)`` pairs picked by ``spec``, in the model's order."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError("params is empty; pass a module, a name pattern or a list of them")
    chosen: set[int] = set()
    for item in items:
        if isinstance(item, nn.Module):
            found = {id(p) for p in item.parameters()}
            what = f"module {type(item).__name__}"
        elif isinstance(item, str):
            found = {id(p) for n, p in named if fnmatch.fnmatchcase(n, item)}
            what = f"pattern {item!r}"
        elif isinstance(item, torch.Tensor):
            found = {id(item)}
            what = f"a tensor of shape {list(item.shape)}"
        else:
            raise TypeError(
                "params entries must be modules, name patterns or parameter tensors, got "
                f"{type(item).__name__}"
            )
        hit = found & {id(p) for _, p in named}
        if not hit:
            names = ", ".join(n for n, _ in named[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(
                f"params: {what} selects no trainable parameter of the model (trainable: {names})"
            )
        chosen |= hit
    return [(n, p) for n, p in named if id(p) in chosen]


#: Fraction of the free memory (RAM on CPU, free GPU memory on CUDA) used when no budget is given.
FREE_MEMORY_FRACTION = 0.5
#: A chunk of per-sample gradients holds at most this many numbers (even under a larger budget).
PER_SAMPLE_CHUNK_NUMBERS = 2**25
#: Column blocks of Hessian products are at most this wide (the tangents batched by vmap).
MAX_COLUMNS = 16
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int/float or a string such as ``"8G"``, ``"512MB"`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError(
            f"memory_budget must be a number of bytes or a size like '8G', got {value!r}"
        )
    if isinstance(value, (int, float)):
        if not value >= 1:
            raise ValueError(f"memory_budget must be at least 1 byte (e.g. '8G'), got {value!r}")
        return int(value)
    text = str(value).strip().upper().replace("I", "")
    num = text.rstrip("KMGB")
    unit = text[len(num) :]
    try:
        size = float(num) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(
            f"memory_budget must be a number of bytes or a size like '8G' or '512MB', got {value!r}"
        ) from None
    if not size >= 1:
        raise ValueError(f"memory_budget must be at least 1 byte (e.g. '8G'), got {value!r}")
    return int(size)


def free_memory(device: torch.device) -> int:
    """Free memory of ``device`` in bytes: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on CPU (8 GiB where that cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _gib(nbytes: float) -> str:
    if nbytes >= 2**28:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**18:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes >= 2**10 else f"{int(nbytes)} bytes"


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the self-checks (rounding of sums over a batch in ``dtype``)."""
    if dtype == torch.float64:
        return 1e-9
    if dtype in _LOW_PRECISION:
        return 3e-2
    return 2e-4


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


_map_tensors = _data.map_tensors
_tensors = _data._leaves


def _unsqueeze(obj: Any) -> Any:
    """A sample as a batch of one."""
    return _map_tensors(lambda t: t.unsqueeze(0), obj)


def _row(obj: Any, i: int) -> Any:
    """Sample i of a batch (the batch dimension removed)."""
    return _map_tensors(lambda t: t[i], obj)


def _slice(obj: Any, i: int) -> Any:
    """Sample i of a batch as a batch of one."""
    return _map_tensors(lambda t: t[i : i + 1], obj)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Scaled-dot-product attention on the math kernel (fused kernels have no double backward
    and no forward-mode derivative, on CPU too)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _coupling_modules(model: nn.Module) -> list[str]:
    """Names of sub-modules whose training-mode forward couples samples or is random."""
    bad = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        ):
            bad.append(f"{name or kind} ({kind}, training mode)")
    return bad


def raise_if_out_of_memory(exc: BaseException) -> None:
    """Re-raise a failed allocation as ``MemoryError``: running out of memory is not a missing
    derivative or batching rule, and switching to a slower route for it would silently change
    the rounding of every later number (a route is chosen once per problem).

    Raises:
        MemoryError: ``exc`` is an out-of-memory error (says to lower ``memory_budget``).
    """
    text = str(exc).lower()
    oom = isinstance(exc, torch.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
    )
    if oom:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MemoryError(
            f"a pass ran out of memory ({first}); pass a smaller memory_budget= to the Problem "
            "(every pass is split to fit it)"
        ) from exc


def map_columns(fn: Callable[[torch.Tensor], torch.Tensor], M: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each column ``M[:, j]`` (vmapped, or a loop for layers without a batching
    rule; running out of memory is re-raised, not looped), the column index last in the result."""
    try:
        return vmap(fn, in_dims=1, out_dims=-1)(M)
    except (RuntimeError, NotImplementedError) as exc:
        raise_if_out_of_memory(exc)
        return torch.stack([fn(M[:, j]) for j in range(M.shape[1])], dim=-1)
