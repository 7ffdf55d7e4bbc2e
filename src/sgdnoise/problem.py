"""A model, a loss and a data set, seen as a function of one flat parameter vector θ ∈ R^D.

Conventions (followed everywhere in sgdnoise):

* **Flat parameter order.** θ is the concatenation of ``[p for p in model.parameters() if
  p.requires_grad]``, each flattened row-major (``p.reshape(-1)``), in that order. Frozen parameters
  and buffers are constants.
* **Loss.** ``loss_fn(outputs, targets)`` returns the *mean* loss over a batch (like
  ``F.cross_entropy``), so ``L(θ) = (1/N) Σ_i ℓ(x_i; θ)`` over all N samples and
  ``ℓ(x_i; θ) = loss_fn(model(x_i[None]), y_i[None])``. This is checked, not assumed: a loss that
  is not the mean of its per-sample losses (``reduction='sum'``; a token mean over padded
  sequences, which weights samples by their token count) is refused with an error. Such losses
  are passed as ``reduction="none"``: ``loss_fn`` then returns one loss per sample ``[n]`` (e.g.
  the masked token mean of each sequence) and L is their mean, whatever the chunking.
* **Evaluation point.** Every quantity is evaluated at the model's *current* parameters (read
  anew at each call, so training the model in between is fine); dtype and device follow the model.
* **Routes.** Where PyTorch lacks a rule the computation takes a working route automatically:
  attention runs on the math kernel inside second-order and vmapped passes (fused kernels have
  no double backward or forward-mode derivative); Hessian products fall back from
  forward-over-reverse to double backward (e.g. ``F.mse_loss``'s ZeroTensor paths), and from
  batched to column-by-column; per-sample passes fall back from ``vmap`` to a loop over samples
  (e.g. ``nn.LSTM``, which has no batching rule). ``Problem.routes`` records what was chosen.
* **Reductions.** Every average over samples (loss, gradient, Hessian products, sums in
  estimators) goes through :meth:`Problem.reduce_mean`, chunk by chunk, each chunk weighted by its
  size. This is the one place a later version shards over processes.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from . import _data
from . import _per_sample as _hooks
from ._utils import check_finite

__all__ = ["Problem", "per_sample_gradients"]

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


def _by_columns(fn: Callable[[torch.Tensor], torch.Tensor], M: torch.Tensor) -> torch.Tensor:
    """``[fn(M[:, j])]_j`` as columns: vmapped, or a loop where an operation has no batching rule."""
    try:
        return vmap(fn, in_dims=1, out_dims=1)(M)
    except (RuntimeError, NotImplementedError):
        return torch.stack([fn(M[:, j]) for j in range(M.shape[1])], dim=1)


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


class Problem:
    """A model + mean loss + data set, as a function of the flat parameter vector θ.

    Args:
        model: any ``torch.nn.Module``; its trainable parameters define θ (see module docstring).
        loss_fn: ``loss_fn(outputs, targets)`` → scalar *mean* loss over the batch.
        inputs: tensor ``[N, ...]``, or a tuple/list of tensors (the model is called as
            ``model(*inputs)``) or a dict of tensors (``model(**inputs)``, as Hugging Face models
            take them), batch on dimension 0; floating tensors are cast to the model's dtype and
            moved to its device. **Or**, with ``targets`` omitted, the whole data set: a map-style
            ``torch.utils.data.Dataset`` (``ds[i] -> (x, y)``), a ``DataLoader`` (without
            shuffling), or any re-iterable of ``(inputs, targets)`` batches; samples are then read
            chunk by chunk, so N may exceed what fits in memory. Batches are weighted by their
            size (a smaller last batch is fine); the order must be the same on every pass
            (checked).
        targets: tensor ``[N, ...]`` (class indices, regression targets, ...), moved to the model's
            device; floating targets are cast to the model's dtype. ``None`` when ``inputs`` is a
            data set.
        chunk_size: largest number of samples processed at once by every pass over the data
            (``None``: as many as the memory budget allows).
        memory_budget: bytes (or a size such as ``"8G"``) that one pass may use at its peak;
            ``None``: half of the device's free memory (RAM on CPU, free GPU memory on CUDA),
            measured once, at the problem's first pass. Every pass — losses, gradients,
            per-sample gradients, Hessian and Σ_b products, batched losses — is split over samples
            (and Hessian products over columns) to stay under it, from the activation memory per
            sample measured on the model (saved tensors of one and two samples). Results do not
            depend on the split beyond floating-point order; pass a fixed budget (or
            ``chunk_size``) for bit-identical results across machines. A pass that cannot fit even
            one sample raises ``MemoryError`` saying how much it needs.
        params: restrict θ to a block of the trainable parameters, the others held fixed at
            their current values (per-layer quantities): a module (its parameters), a name
            pattern (``fnmatch``, e.g. ``"layer1.*"``), or a list of modules, names, patterns or
            parameter tensors. ``None``: every trainable parameter. θ keeps the model's order.
        reduction: ``"mean"`` (default): ``loss_fn`` returns the mean loss of a batch, and this is
            checked (the first samples when the problem is built, every chunk of every
            per-sample pass); ``"none"``: ``loss_fn`` returns one loss per sample ``[n]`` (e.g.
            the masked token mean of each sequence) and sgdnoise takes their mean — the way to
            use token-level losses, padding and ``ignore_index`` so that every quantity is
            independent of the chunking.

    Attributes:
        routes: ``{quantity: how it is computed}`` for quantities whose fast route did not apply to
            this model (e.g. ``"per_sample"``, ``"hvp"``), with the reason.

    Raises:
        ValueError: if the model has no trainable parameters, inputs and targets differ in length,
            ``chunk_size`` is not positive, or the loss is not a mean over samples (e.g.
            ``reduction='sum'``), with what to change.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Any = None,
        *,
        chunk_size: int | None = None,
        reduction: str = "mean",
        params: ParamSpec | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> mean loss")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(
                f"reduction must be 'mean' (loss_fn returns the mean loss of a batch) or 'none' "
                f"(loss_fn returns one loss per sample, shape [n]), got {reduction!r}"
            )
        self.reduction = reduction

        self.model = model
        self.loss_fn = loss_fn
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True); θ would be empty"
            )
        if params is not None:
            named = _select_parameters(model, named, params)
        self.param_names: list[str] = [n for n, _ in named]
        self.param_shapes: list[torch.Size] = [p.shape for _, p in named]
        self.param_numels: list[int] = [p.numel() for _, p in named]
        first = named[0][1]
        for n, p in named:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"all trainable parameters must share one dtype and device; {self.param_names[0]} "
                    f"is {first.dtype} on {first.device} but {n} is {p.dtype} on {p.device}"
                )
            if not p.is_floating_point():
                raise TypeError(f"trainable parameter {n} must be floating point, got {p.dtype}")
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        if self.device.type == "meta":
            raise ValueError(
                "the model's parameters are on the 'meta' device (shapes without data); "
                "materialise them first (model.to_empty(device='cpu') and initialise, or load "
                "weights), then build the Problem"
            )
        self.dim: int = sum(self.param_numels)
        self._source = _data.make_source(inputs, targets, self.device, self.dtype)
        self.num_samples: int = int(self._source.num_samples)
        if self.num_samples == 0:
            raise ValueError("the data set is empty (N = 0); pass at least one sample")
        self.chunk_size = chunk_size
        self._budget_arg = None if memory_budget is None else parse_memory(memory_budget)
        self._budget: int | None = self._budget_arg
        self._footprint_bytes: tuple[float, float] | None = None
        #: the computational routes chosen so far (what ran, and why a faster one was not used).
        self.routes: dict[str, str] = {}
        self._hvp_mode = "forward-over-reverse"
        self._vmap_ok: bool | None = None
        self._batched_theta_ok: bool | None = None
        self._hooks_state = "unverified"  # "ok" once verified, "failed" with routes["hooks"]
        self._hvp_verified = False
        self._losses_jvp_mode = "forward"
        self._func_grad_ok = True
        self._losses_jvp_checked = False
        self._hvp_error: str | None = None
        self._check_loss_convention()

    @property
    def inputs(self) -> Any:
        """All inputs (problems built from tensors; use :meth:`take` for data sets)."""
        if isinstance(self._source, _data.TensorSource):
            return self._source.inputs
        raise AttributeError(
            "this Problem reads its samples from a data set; use problem.take(indices) for rows"
        )

    @property
    def targets(self) -> Any:
        """All targets (problems built from tensors; use :meth:`take` for data sets)."""
        if isinstance(self._source, _data.TensorSource):
            return self._source.targets
        raise AttributeError(
            "this Problem reads its samples from a data set; use problem.take(indices) for rows"
        )

    def take(self, indices: torch.Tensor | Sequence[int]) -> tuple[Any, Any]:
        """The samples ``indices`` (any order, repeats allowed) as one batch ``(inputs, targets)``
        on the model's device."""
        idx = self.check_indices(indices)
        assert idx is not None
        return self._source.take(idx)

    def restrict(self, params: ParamSpec) -> Problem:
        """The same model, loss and data with θ restricted to a block of parameters (see
        ``params`` in :class:`Problem`); the other parameters are held fixed."""
        return Problem(
            self.model,
            self.loss_fn,
            self._source,
            None,
            chunk_size=self.chunk_size,
            reduction=self.reduction,
            params=params,
            memory_budget=self._budget_arg,
        )

    # ------------------------------------------------------------------ flat parameters
    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, D={self.dim}, N={self.num_samples}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def _trainable(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        try:
            found = [params[n] for n in self.param_names]
        except KeyError as exc:
            raise RuntimeError(
                f"the model no longer has the parameter {exc.args[0]} it had when the Problem was "
                "built; build a new Problem after changing the model"
            ) from None
        for n, p in zip(self.param_names, found, strict=True):
            if p.dtype != self.dtype or p.device != self.device:
                raise RuntimeError(
                    f"parameter {n} is now {p.dtype} on {p.device}, but the Problem was built for "
                    f"{self.dtype} on {self.device} (the model was converted or moved after); build "
                    "a new Problem after model.to(...)"
                )
        return found

    def theta(self) -> torch.Tensor:
        """The current flat parameter vector θ ``[D]`` (a detached copy)."""
        return self.flatten([p.detach() for p in self._trainable()])

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (same shapes as the trainable parameters) to ``[D]``."""
        if len(tensors) != len(self.param_shapes):
            raise ValueError(
                f"expected {len(self.param_shapes)} tensors (one per trainable parameter), "
                f"got {len(tensors)}"
            )
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``[..., D]`` into ``{name: tensor[..., *shape]}`` views (a leading batch is kept)."""
        if theta.shape[-1] != self.dim:
            raise ValueError(
                f"expected a flat vector with last dimension D={self.dim}, got {list(theta.shape)}"
            )
        lead = theta.shape[:-1]
        pieces = torch.split(theta, self.param_numels, dim=-1)
        return {
            n: piece.reshape(*lead, *shape)
            for n, piece, shape in zip(self.param_names, pieces, self.param_shapes, strict=True)
        }

    def set_theta(self, theta: torch.Tensor) -> None:
        """Write ``theta`` ``[D]`` into the model's trainable parameters (in place, no autograd)."""
        self._check_vector(theta, "theta")
        with torch.no_grad():
            for p, piece in zip(self._trainable(), self.unflatten(theta).values(), strict=True):
                p.copy_(piece)

    def _check_vector(self, v: torch.Tensor, what: str) -> None:
        if not isinstance(v, torch.Tensor) or v.shape != (self.dim,):
            shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{what} must be a flat vector of shape [{self.dim}], got {shape}")
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(
                f"{what} must be {self.dtype} on {self.device} (the model's), got {v.dtype} on {v.device}"
            )

    # ------------------------------------------------------------------ functional loss
    def _check_decoupled(self, what: str) -> None:
        bad = _coupling_modules(self.model)
        if bad:
            raise RuntimeError(
                f"{what} needs a model whose forward treats samples independently and "
                f"deterministically, but these modules are in training mode: {', '.join(bad)}. "
                "Per-sample gradients and Hessian products are ill-defined there (BatchNorm couples "
                "the samples of a batch and mutates running statistics; dropout is random). Call "
                "model.eval() first, or replace BatchNorm by GroupNorm/LayerNorm."
            )

    def _state(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every (module, attribute) slot of the model, once, with θ's pieces in the trainable ones.

        Each module *object* appears once (a layer registered or called twice is swapped once) and
        a parameter shared by two modules gets the same piece of θ in both (tied weights). This
        is used with ``tie_weights=False``: torch's own tying swaps a module registered under two
        names twice and restores it wrongly (it leaves ``requires_grad=False`` behind).
        """
        pieces = dict(zip(self._trainable_ids(), self.unflatten(theta).values(), strict=True))
        state: dict[str, torch.Tensor] = {}
        for prefix, module in self.model.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, p in module._parameters.items():
                if p is not None:  # parameters outside θ are constants
                    state[dot + name] = pieces.get(id(p), p.detach())
            for name, b in module._buffers.items():
                if b is not None:
                    state[dot + name] = b
        return state

    def _trainable_ids(self) -> list[int]:
        return [id(p) for p in self._trainable()]

    def _outputs(self, theta: torch.Tensor, x: Any) -> Any:
        if isinstance(x, dict):
            args, kwargs = (), x
        else:
            args, kwargs = (tuple(x) if isinstance(x, (tuple, list)) else (x,)), None
        try:
            return functional_call(self.model, self._state(theta), args, kwargs, tie_weights=False)
        except RuntimeError as exc:
            text = str(exc)
            if "inplace" not in text.replace("in-place", "inplace") or "view" not in text:
                raise
            raise RuntimeError(
                "the model changes one of its parameters in place inside forward (e.g. "
                "nn.Embedding(max_norm=...) renormalises rows of its weight): sgdnoise evaluates the "
                "model as a function of θ and cannot follow such an update. Do it outside forward "
                "(e.g. renormalise after each optimizer step). PyTorch said: " + _first_line(exc)
            ) from exc

    def _reduce_outputs(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch from the model's outputs (either reduction)."""
        loss = self.loss_fn(out, y)
        if self.reduction == "none":
            n = _data.batch_size_of(y, "targets")
            if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (n,):
                shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"with reduction='none', loss_fn must return one loss per sample, shape [{n}], "
                    f"got {shape}"
                )
            return loss.mean()
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar mean loss over the batch, got {shape}. Use a mean "
                "reduction (e.g. F.cross_entropy(out, y) with reduction='mean'), or pass "
                "reduction='none' to Problem if loss_fn returns one loss per sample."
            )
        return loss

    def _batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._reduce_outputs(self._outputs(theta, x), y)

    def _sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._batch_loss(theta, _unsqueeze(x), _unsqueeze(y))

    def _losses_from_outputs(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[n]`` from a batch's outputs (``loss_fn`` on each sample's rows)."""
        if self.reduction == "none":
            return self.loss_fn(out, y)
        if self._vmap_ok is not False:
            try:
                return vmap(lambda o, t: self.loss_fn(_unsqueeze(o), _unsqueeze(t)))(out, y)
            except (RuntimeError, NotImplementedError):
                pass
        return torch.stack(
            [
                self.loss_fn(_slice(out, i), _slice(y, i))
                for i in range(_data.batch_size_of(y, "targets"))
            ]
        )

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[ℓ(x_i; θ)]_i`` ``[n]`` of one batch, differentiable in ``theta``.

        Each sample is evaluated as a batch of one (``reduction='mean'``: ``vmap`` over the
        samples, or a loop for layers without a batching rule such as ``nn.LSTM``), or read from
        ``loss_fn``'s per-sample output (``reduction='none'``). Works under ``torch.func`` transforms
        (``jvp``, ``vjp``, ``grad``), so Jacobian products of the per-sample losses can be taken.

        Args:
            theta: flat parameters ``[D]``.
            x, y: a batch of inputs ``[n, ...]`` and targets ``[n, ...]``.
        """
        with _math_attention():
            if self.reduction == "none":
                return self.loss_fn(self._outputs(theta, x), y)
            if self._vmap_ok is not False:
                try:
                    out = vmap(self._sample_loss, in_dims=(None, 0, 0))(theta, x, y)
                    self._vmap_ok = True
                    return out
                except (RuntimeError, NotImplementedError) as exc:
                    if self._vmap_ok:
                        raise
                    self._vmap_failed(exc)
            return torch.stack(
                [
                    self._sample_loss(theta, _row(x, i), _row(y, i))
                    for i in range(_data.batch_size_of(x))
                ]
            )

    def losses_jvp(self, theta: torch.Tensor, x: Any, y: Any, V: torch.Tensor) -> torch.Tensor:
        """``G V`` ``[n, k]``: the per-sample gradients of one batch times ``V`` ``[D, k]``, without
        forming ``G``.

        Forward mode (``jvp`` of :meth:`sample_losses`) where its rules exist and agree with the
        backward — checked once per problem against the reverse-mode route on one column (a
        forward-mode rule can disagree with its backward: ``Embedding(padding_idx)`` zeroes the
        padding row in the backward only). Otherwise reverse mode: ``G v`` is the derivative of
        ``Gᵀu`` (one backward pass, linear in u) with respect to u along v; and where that has no
        double-backward rule either (e.g. the mkldnn LSTM kernel), per-sample gradients times V.
        """

        def f(th: torch.Tensor) -> torch.Tensor:
            return self.sample_losses(th, x, y)

        if self._losses_jvp_mode == "forward":
            try:
                out = _by_columns(lambda v: jvp(f, (theta,), (v,))[1], V)
                if self._losses_jvp_checked:
                    return out
                self._losses_jvp_checked = True
                ref = self._losses_jvp_reverse(f, theta, x, y, V[:, :1])
                err = float((out[:, :1] - ref).norm())
                if err <= _rtol(self.dtype) * float(ref.norm() + out[:, :1].norm()) + 1e-300:
                    return out
                why = "forward-mode rules disagree with the backward (e.g. Embedding(padding_idx))"
            except (RuntimeError, NotImplementedError) as exc:
                why = f"forward mode failed ({_first_line(exc)})"
            self._losses_jvp_mode = "reverse"
            self.routes["losses_jvp"] = f"reverse mode: {why}"
        return self._losses_jvp_reverse(f, theta, x, y, V)

    def _losses_jvp_reverse(
        self,
        f: Callable[[torch.Tensor], torch.Tensor],
        theta: torch.Tensor,
        x: Any,
        y: Any,
        V: torch.Tensor,
    ) -> torch.Tensor:
        if self._losses_jvp_mode != "per-sample":
            try:
                th = theta.clone().requires_grad_(True)
                with torch.enable_grad(), _math_attention():
                    losses = f(th)
                    u = torch.zeros_like(losses, requires_grad=True)
                    (gtu,) = torch.autograd.grad(losses, th, grad_outputs=u, create_graph=True)
                    cols = [
                        torch.autograd.grad(gtu, u, grad_outputs=V[:, j], retain_graph=True)[0]
                        for j in range(V.shape[1])
                    ]
                return torch.stack(cols, dim=1).detach()
            except (RuntimeError, NotImplementedError) as exc:
                self._losses_jvp_mode = "per-sample"
                self.routes["losses_jvp"] = (
                    f"per-sample gradients times V: no double-backward rule ({_first_line(exc)})"
                )
        G, _ = self._general_per_sample(theta, x, y)
        return G @ V

    def _vmap_failed(self, exc: BaseException) -> None:
        self._vmap_ok = False
        self.routes["per_sample"] = (
            f"a loop over samples: torch.func.vmap failed on this model ({_first_line(exc)})"
        )

    def _check_loss_convention(self) -> None:
        """Refuse a loss that is not a mean over samples, on the first few samples (cheap).

        The same check runs on every chunk of every per-sample pass (see
        :meth:`per_sample_gradients_and_losses`), so data further on is covered as it is used.
        """
        k = min(self.num_samples, 3)
        if k < 2 or _coupling_modules(self.model):
            return
        theta = self.theta()
        x, y = self._source.take(torch.arange(k))
        try:
            with torch.no_grad(), _math_attention():
                out = self._outputs(theta, x)
                raw = self.loss_fn(out, y)
                if self.reduction == "none":
                    self._reduce_outputs(out, y)  # shape check
                    return
                if not isinstance(raw, torch.Tensor) or raw.ndim != 0:
                    self._reduce_outputs(out, y)  # raises the explanatory error
                singles = torch.stack(
                    [self._sample_loss(theta, _row(x, i), _row(y, i)) for i in range(k)]
                )
        except ValueError:
            raise
        except Exception:  # the model's own errors surface on its first real use
            return
        self._compare_batch_and_samples(raw, singles, 0)

    def _compare_batch_and_samples(
        self, batch: torch.Tensor, singles: torch.Tensor, start: int
    ) -> None:
        """Raise if the loss of a batch is not the mean of its per-sample losses."""
        if not bool(torch.isfinite(batch)) or not bool(torch.isfinite(singles).all()):
            return  # reported by the finiteness checks, with the samples named
        b, mean = float(batch), float(singles.double().mean())
        scale = float(singles.double().abs().mean())
        if abs(b - mean) <= _rtol(self.dtype) * scale + 1e-30:
            return
        n = singles.numel()
        what = (
            f"loss_fn(outputs, targets) on samples {start}..{start + n - 1} gives {b:.6g}, but the "
            f"mean of their {n} single-sample losses is {mean:.6g}"
        )
        if scale > 0 and abs(b - n * mean) <= 10 * _rtol(self.dtype) * n * scale:
            raise ValueError(
                f"{what} (= their sum): the loss is summed over samples. sgdnoise's convention is "
                "the *mean* loss L = (1/N) Σ_i ℓ_i; use reduction='mean' (e.g. "
                "nn.CrossEntropyLoss(reduction='mean')) or divide by the batch size."
            )
        raise ValueError(
            f"{what}: the loss of a batch is not the mean of its per-sample losses. Either the loss "
            "is not a sample mean (a token mean over padded sequences or ignore_index weights "
            "samples by their number of tokens; a sum), or the model couples the samples of a "
            "batch (batch statistics), or its forward is not deterministic (randomness, a buffer "
            "updated inside forward). sgdnoise needs L = (1/N) Σ_i ℓ_i: pass reduction='none' to "
            "Problem with a loss_fn that returns one loss per sample (e.g. the masked token mean "
            "of each sequence), or make the model treat samples independently."
        )

    # ------------------------------------------------------------------ the one reduction
    def check_indices(self, indices: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
        """Validate sample indices (``None`` = all samples) and return them as a long tensor.

        Integer indices (any order, repeats allowed) or a boolean mask of length N.
        """
        if indices is None:
            return None
        raw = torch.as_tensor(indices)
        if raw.dtype == torch.bool:
            if raw.shape != (self.num_samples,):
                raise ValueError(
                    f"a boolean mask of samples must have shape [N] = [{self.num_samples}], got "
                    f"{list(raw.shape)}"
                )
            raw = raw.nonzero().flatten()
        elif raw.is_floating_point() or raw.is_complex():
            raise TypeError(
                f"sample indices must be integers (or a boolean mask), got dtype {raw.dtype}"
            )
        idx = raw.to(device=self.device, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("indices is empty; pass at least one sample index (or None for all)")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_samples:
            raise IndexError(
                f"sample indices must lie in [0, {self.num_samples - 1}], got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return idx

    def chunks(
        self, indices: torch.Tensor | None = None, chunk_size: int | None = None
    ) -> Iterator[tuple[Any, Any, slice]]:
        """Consecutive ``(x, y, positions)`` pieces of at most ``chunk_size`` selected samples."""
        return self._source.chunks(indices, chunk_size or self.chunk_size)

    def reduce_mean(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        indices: torch.Tensor | None = None,
        *,
        rows: int | None = None,
    ) -> torch.Tensor:
        """``Σ_c (n_c / n) · fn(x_c, y_c)`` over chunks c of the (selected) data.

        ``fn`` returns a *mean* over its chunk; each chunk is weighted by its size, so the result
        is the exact mean over all selected samples whatever the chunking. ``rows``: samples per
        chunk (default: :meth:`plan_rows` for a gradient pass).
        """
        indices = self.check_indices(indices)
        n = self.num_samples if indices is None else int(indices.numel())
        total: torch.Tensor | None = None
        for x, y, pos in self.chunks(indices, rows or self.plan_rows("gradient")):
            part = fn(x, y) * ((pos.stop - pos.start) / n)
            total = part if total is None else total + part
        assert total is not None
        return total

    # ------------------------------------------------------------------ loss, gradient, HVP
    def loss(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``L(θ) = (1/n) Σ_i ℓ(x_i; θ)`` over all (or the selected) samples, at θ (default: current)."""
        self._check_decoupled("Problem.loss")
        theta = self.theta() if theta is None else theta
        with torch.no_grad():
            value = self.reduce_mean(
                lambda x, y: self._batch_loss(theta, x, y), indices, rows=self.plan_rows("forward")
            )
        check_finite(value, "the loss")
        return value

    def loss_and_gradient(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(θ), ∇L(θ))`` with one forward and one backward pass per chunk."""
        self._check_decoupled("Problem.gradient")
        theta = (self.theta() if theta is None else theta).detach()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            th = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self._batch_loss(th, x, y)
                (g,) = torch.autograd.grad(loss, th)
            return torch.cat([loss.detach().reshape(1), g])

        both = self.reduce_mean(fn, indices)
        check_finite(both[:1], "the loss")
        check_finite(both[1:], "the gradient")
        return both[0], both[1:]

    def gradient(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``∇L(θ)`` ``[D]`` (mean over samples)."""
        return self.loss_and_gradient(theta, indices)[1]

    def hvp(
        self,
        V: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        *,
        max_columns: int = MAX_COLUMNS,
    ) -> torch.Tensor:
        """Hessian products ``∇²L(θ) V`` for ``V`` of shape ``[D, k]``.

        Forward-over-reverse (``vmap`` over ``jvp(grad(L))``): the primal forward/backward is
        shared by all columns and only the tangents are batched, at most ``max_columns`` at a
        time and fewer (and over fewer samples) when the memory budget asks for it. Operations without a forward-mode derivative or a batching rule make it fall
        back, once per problem, to batched double backward and then to double backward column by
        column (recorded in ``routes["hvp"]``). Attention runs on the math kernel.

        Raises:
            RuntimeError: if no route can differentiate the model twice (names the failing
                operation and what to change).
        """
        self._check_decoupled("Hessian-vector products")
        theta = (self.theta() if theta is None else theta).detach()
        if self._hvp_error is not None:
            raise RuntimeError(self._hvp_error)
        if not self._hvp_verified:
            self._hvp_verified = True
            try:
                self._verify_hvp(theta)
            except RuntimeError as exc:
                self._hvp_error = str(exc)
                raise

        cols, rows = self.plan_columns(min(max_columns, max(1, V.shape[1])))

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            blocks = [
                self._hvp_block(theta, V[:, j : j + cols], x, y) for j in range(0, V.shape[1], cols)
            ]
            return torch.cat(blocks, dim=1)

        out = self.reduce_mean(fn, indices, rows=rows)
        check_finite(out, "a Hessian-vector product")
        return out

    def _hvp_block(
        self, theta: torch.Tensor, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        with _math_attention():
            if self._hvp_mode == "forward-over-reverse":
                g = grad(lambda t: self._batch_loss(t, x, y))
                try:
                    # "+ 0 * v" keeps the output batched when H = 0 (a loss linear in θ).
                    return vmap(lambda v: jvp(g, (theta,), (v,))[1] + 0 * v, in_dims=1, out_dims=1)(
                        V
                    )
                except (NotImplementedError, RuntimeError) as exc:
                    self._hvp_mode = "double backward"
                    self.routes["hvp"] = (
                        f"double backward: forward-over-reverse failed ({_first_line(exc)})"
                    )
            th = theta.clone().requires_grad_(True)
            try:
                with torch.enable_grad():
                    loss = self._batch_loss(th, x, y)
                    (g,) = torch.autograd.grad(loss, th, create_graph=True)
                    if not g.requires_grad:  # the loss is linear in θ: H = 0
                        return torch.zeros_like(V)
                    if V.shape[1] == 1 or self._hvp_mode == "double backward, column by column":
                        cols = [
                            torch.autograd.grad(g, th, grad_outputs=V[:, j], retain_graph=True)[0]
                            for j in range(V.shape[1])
                        ]
                        return torch.stack(cols, dim=1)
                    try:
                        (hv,) = torch.autograd.grad(
                            g, th, grad_outputs=V.T, is_grads_batched=True, retain_graph=True
                        )
                        return hv.T
                    except (NotImplementedError, RuntimeError) as exc:
                        self._hvp_mode = "double backward, column by column"
                        self.routes["hvp"] = (
                            f"double backward column by column: batched products failed "
                            f"({_first_line(exc)})"
                        )
                        cols = [
                            torch.autograd.grad(g, th, grad_outputs=V[:, j], retain_graph=True)[0]
                            for j in range(V.shape[1])
                        ]
                        return torch.stack(cols, dim=1)
            except (NotImplementedError, RuntimeError) as exc:
                where = self._module_without_second_derivative(x)
                raise RuntimeError(
                    "Hessian-vector products need second derivatives of the model, and PyTorch has "
                    f"none for an operation{where}: {_first_line(exc)}. Replace that operation by "
                    "one with a double-backward rule (fused attention: torch.nn.attention."
                    "sdpa_kernel(SDPBackend.MATH) around your own call; a custom autograd.Function: "
                    "make its backward differentiable, without @once_differentiable), then run "
                    "sgdnoise.check(problem)."
                ) from exc

    def _verify_hvp(self, theta: torch.Tensor) -> None:
        """Once per problem: ``H v`` against central differences of ∇L on the first 4 samples.

        Catches a wrong second derivative anywhere in the model or in PyTorch (a custom
        ``autograd.Function`` whose backward is not differentiable returns a wrong product without
        any error). The rule is :func:`sgdnoise.diagnostics.hvp_finite_difference_check` (the
        one :func:`sgdnoise.check` reports): differences at several step sizes, on a float64 copy
        of the model below float64; inconclusive directions (ReLU kinks) pass. Skipped for
        models above 2^27 parameters, where the copy would cost too much memory.
        """
        if self.dim > 2**27:
            self.routes["hvp_check"] = "skipped (D > 2^27); run sgdnoise.check(problem)"
            return
        from .diagnostics import hvp_finite_difference_check

        # A few samples suffice: the check is about the model's derivative rules, not the data.
        few = torch.arange(min(self.num_samples, 4), device=self.device)
        if not self._hvp_symmetric(theta, few):
            if self._hvp_mode != "forward-over-reverse":
                where = self._module_without_second_derivative(self._source.take(few[:1])[0])
                raise RuntimeError(
                    "Hessian-vector products are not symmetric for this model (uᵀHv ≠ vᵀHu) by "
                    f"double backward: an operation{where or ' in the model'} has inconsistent "
                    "second derivatives — typically a custom autograd.Function whose backward is "
                    "not itself differentiable (@once_differentiable, or torch.no_grad / .detach() "
                    "inside backward). Make that backward differentiable; sgdnoise.check(problem) "
                    "reports the details."
                )
            self._hvp_mode = "double backward"
            self.routes["hvp"] = (
                "double backward: forward-over-reverse gives a non-symmetric H (a forward-mode "
                "rule disagrees with its backward, e.g. Embedding(padding_idx))"
            )
            if not self._hvp_symmetric(theta, few):
                raise RuntimeError(
                    "Hessian-vector products are not symmetric for this model (uᵀHv ≠ vᵀHu) by "
                    "forward-over-reverse or by double backward. Run sgdnoise.check(problem)."
                )
            # The gradient itself is not the derivative of the loss along every direction
            # (e.g. padding rows whose gradient is zero by convention): finite differences of
            # it cannot judge H, the symmetric route is the one consistent with the gradient.
            self.routes["hvp_check"] = "symmetric by double backward (finite differences skipped)"
            return
        result = hvp_finite_difference_check(
            self, theta, few, torch.Generator().manual_seed(0), levels=3
        )
        if result.passed:
            self.routes["hvp_check"] = result.detail
            return
        where = self._module_without_second_derivative(self._source.take(torch.arange(1))[0])
        raise RuntimeError(
            f"Hessian-vector products are wrong for this model{where}: {result.detail}"
        )

    def _hvp_symmetric(self, theta: torch.Tensor, few: torch.Tensor) -> bool:
        """``|uᵀHv − vᵀHu| ≤ tol (|uᵀHv| + |vᵀHu|)`` for two random vectors (the route's check)."""
        gen = torch.Generator().manual_seed(1)
        UV = torch.randn(self.dim, 2, generator=gen, dtype=torch.float64).to(
            self.device, self.dtype
        )
        with torch.no_grad():
            HUV = self.hvp_unchecked(UV, theta, few).double()
        uhv, vhu = float(UV[:, 0].double() @ HUV[:, 1]), float(UV[:, 1].double() @ HUV[:, 0])
        scale = float(UV.double().norm(dim=0).prod() * HUV.norm(dim=0).max())
        return abs(uhv - vhu) <= 100 * _rtol(self.dtype) * (abs(uhv) + abs(vhu) + 1e-3 * scale)

    def hvp_unchecked(
        self, V: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`hvp` without the one-time finite-difference check (for diagnostics)."""
        saved = self._hvp_verified, self._hvp_error
        self._hvp_verified, self._hvp_error = True, None
        try:
            return self.hvp(V, theta, indices)
        finally:
            self._hvp_verified, self._hvp_error = saved

    def _module_without_second_derivative(self, x: torch.Tensor) -> str:
        """`` in module NAME (Type)`` for the innermost module that cannot be differentiated twice
        on its own (a diagnosis run only after a failure), or ``""``."""
        calls: list[tuple[nn.Module, tuple[object, ...], dict[str, object]]] = []

        def record(module: nn.Module, args: tuple, kwargs: dict, _: object) -> None:
            calls.append((module, args, kwargs))

        handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.model.modules()]
        try:
            with torch.no_grad():
                _data.call_model(self.model, _slice(x, 0))
        except Exception:  # the diagnosis must not hide the original error
            return ""
        finally:
            for h in handles:
                h.remove()
        names = {id(m): n for n, m in self.model.named_modules()}

        def fresh(t: torch.Tensor) -> torch.Tensor:
            return t.detach().requires_grad_(t.is_floating_point())

        for module, args, kwargs in calls:  # post-hooks fire innermost first
            args2, kwargs2 = _map_tensors(fresh, tuple(args)), _map_tensors(fresh, dict(kwargs))
            ins = [t for t in _tensors((args2, kwargs2)) if t.requires_grad]
            ins += [p for p in module.parameters() if p.requires_grad]
            try:
                with torch.enable_grad():
                    outs = [o for o in _tensors(module(*args2, **kwargs2)) if o.requires_grad]
            except Exception:  # a module that cannot run on its own: try the next one
                continue
            if not outs or not ins:
                continue
            try:
                with torch.enable_grad():
                    total = sum((o * o).sum() for o in outs)
                    grads = torch.autograd.grad(total, ins, create_graph=True, allow_unused=True)
                    second = sum(g.sum() for g in grads if g is not None and g.requires_grad)
                    if isinstance(second, torch.Tensor):
                        torch.autograd.grad(second, ins, allow_unused=True)
            except (RuntimeError, NotImplementedError):
                name = names.get(id(module)) or "(the model itself)"
                return f" in module {name} ({type(module).__name__})"
        return ""

    # ------------------------------------------------------------------ per-sample quantities
    def _per_sample_chunk_size(self) -> int:
        # within the memory budget, and never more than PER_SAMPLE_CHUNK_NUMBERS numbers per chunk
        # (a chunk is a transient buffer; the materialised [N, D] matrix has its own rule)
        return max(
            1, min(self.plan_rows("per_sample"), PER_SAMPLE_CHUNK_NUMBERS // max(1, self.dim))
        )

    # ------------------------------------------------------------------ memory budget
    @property
    def memory_budget(self) -> int:
        """Bytes one pass may use (the argument, or half the free memory at the first pass)."""
        if self._budget is None:
            self._budget = int(free_memory(self.device) * FREE_MEMORY_FRACTION)
        return self._budget

    def _footprint(self) -> tuple[float, float]:
        """``(fixed, per_sample)`` bytes saved for backward by a forward pass with gradients,
        measured once on one and two samples (saved tensors, counted once per storage)."""
        if self._footprint_bytes is not None:
            return self._footprint_bytes
        sizes = []
        for n in (1, 2) if self.num_samples >= 2 else (1,):
            x, y = self._source.take(torch.arange(n))
            seen: dict[int, int] = {}

            def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
                try:
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
                except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
                    seen[id(t)] = t.numel() * t.element_size()
                return t

            th = self.theta().requires_grad_(True)
            data = sum(t.numel() * t.element_size() for t in _tensors((x, y)))
            try:
                with (
                    torch.enable_grad(),
                    _math_attention(),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                ):
                    self._batch_loss(th, x, y)
            except Exception:  # the model's errors surface in the real pass, not here
                seen = {}
            sizes.append(float(sum(seen.values()) + data))
        if len(sizes) == 2:
            per = max(sizes[1] - sizes[0], sizes[0] / 4, 1.0)
            fixed = max(sizes[0] - per, 0.0)
        else:
            per, fixed = max(sizes[0], 1.0), 0.0
        self._footprint_bytes = (fixed, per)
        return self._footprint_bytes

    def _cost(self, kind: str, columns: int = 1) -> tuple[float, float]:
        """``(fixed, per_sample)`` peak bytes of one chunk of a pass of ``kind``."""
        a0, a1 = self._footprint()
        d = self.dim * torch.finfo(self.dtype).bits // 8
        if kind == "forward":
            return a0, a1
        if kind == "gradient":
            return a0 + 3 * d, a1
        if kind == "hvp":  # primal + tangents of forward-over-reverse for `columns` directions
            c = 1 + 2 * columns
            return c * a0 + 4 * columns * d, c * a1
        if kind == "per_sample":
            return a0 + 2 * d, 2 * a1 + 3 * d
        if kind == "batched":  # `columns` parameter vectors at once, no gradients
            return columns * (a0 + d), columns * a1
        raise ValueError(f"unknown pass kind {kind!r}")

    def plan_rows(self, kind: str, columns: int = 1) -> int:
        """Samples per chunk for a pass of ``kind`` (``"forward"``, ``"gradient"``, ``"hvp"``,
        ``"per_sample"``, ``"batched"``) with ``columns`` products/vectors at once, so that its
        estimated peak stays under :attr:`memory_budget` (and at most ``chunk_size``).

        Raises:
            MemoryError: if one sample does not fit, with the bytes it needs.
        """
        fixed, per = self._cost(kind, columns)
        budget = self.memory_budget
        if fixed + per > budget:
            raise MemoryError(
                f"a {kind} pass of this model needs about {_gib(fixed + per)} for one sample"
                + (f" and {columns} columns" if columns > 1 else "")
                + f", more than the memory budget of {_gib(budget)}. Raise memory_budget "
                "(Problem(..., memory_budget='16G')), free memory, or use a smaller model/dtype."
            )
        rows = int((budget - fixed) // per)
        cap = self.chunk_size or self.num_samples
        return max(1, min(rows, cap, self.num_samples))

    def plan_columns(self, wanted: int, kind: str = "hvp") -> tuple[int, int]:
        """``(columns, rows)``: the widest block of at most ``wanted`` products whose one-sample
        pass fits the budget, and the samples per chunk for it (``MemoryError`` if even one
        column of one sample does not fit)."""
        cols = max(1, wanted)
        while cols > 1:
            fixed, per = self._cost(kind, cols)
            if fixed + per * min(self.num_samples, 8) <= self.memory_budget:
                break
            cols //= 2
        return cols, self.plan_rows(kind, cols)

    def per_sample_gradients(
        self,
        indices: torch.Tensor | Sequence[int] | None = None,
        theta: torch.Tensor | None = None,
        *,
        method: str = "auto",
    ) -> torch.Tensor:
        """Per-sample gradients ``G[i] = ∇_θ ℓ(x_i; θ)`` ``[n, D]``, chunked.

        Args:
            indices: sample indices (``None``: all N).
            theta: evaluation point (``None``: the model's current parameters).
            method: ``"vmap"`` (``torch.func.vmap(grad(...))``, any model; a loop over samples
                where vmap has no batching rule), ``"hooks"`` (one forward and one backward pass
                with layer hooks, at the current parameters, only where its assumptions hold —
                see :mod:`sgdnoise._per_sample` for the rule — else ``ValueError`` naming the
                module), or ``"auto"`` (hooks where their assumptions are verified, else vmap).
        """
        return self.per_sample_gradients_and_losses(indices, theta, method=method)[0]

    def per_sample_gradients_and_losses(
        self,
        indices: torch.Tensor | Sequence[int] | None = None,
        theta: torch.Tensor | None = None,
        *,
        method: str = "auto",
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients ``[n, D]`` and losses ``ℓ(x_i; θ)`` ``[n]`` from the same passes.

        ``G.mean(0)`` is then ``∇L`` and ``losses.mean()`` is ``L`` (for all samples) without a
        second pass. See :meth:`per_sample_gradients` for ``method``. ``out``: a contiguous
        ``[n, D]`` tensor (problem dtype and device) to write the gradients into and return,
        e.g. a buffer reused across training steps (allocating a fresh large matrix every step
        costs page faults).

        Every chunk is also checked against the loss convention: the loss of the chunk must be
        the mean of its per-sample losses (``ValueError`` otherwise, see :class:`Problem`).

        Raises:
            FloatingPointError: a per-sample loss or gradient is NaN/inf; the message names the
                samples (and the usual cause: a sample whose targets are all ``ignore_index``).
        """
        if method not in ("auto", "vmap", "hooks"):
            raise ValueError(f"method must be 'auto', 'vmap' or 'hooks', got {method!r}")
        self._check_decoupled("per_sample_gradients")
        idx = self.check_indices(indices)
        current = self.theta()
        theta = current if theta is None else theta.detach()
        at_current = theta is current or torch.equal(theta, current)
        use_hooks = method != "vmap" and self._hooks_usable(method, at_current)
        size = self._per_sample_chunk_size()
        n = self.num_samples if idx is None else int(idx.numel())
        # One [n, D] buffer filled chunk by chunk (the hook path writes into it directly).
        if out is None:
            G = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        elif (
            tuple(out.shape) != (n, self.dim)
            or out.dtype != self.dtype
            or out.device != self.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous [{n}, {self.dim}] tensor of dtype {self.dtype} on "
                f"{self.device}, got {list(out.shape)} {out.dtype} on {out.device}"
                + ("" if out.is_contiguous() else " (not contiguous)")
            )
        else:
            G = out
        ell = torch.empty(n, dtype=self.dtype, device=self.device)
        for x, y, pos in self.chunks(idx, size):
            batch_loss = None
            if use_hooks:
                got = self._hooks_chunk(theta, x, y, G[pos], method)
                if got is None:
                    use_hooks = False
                else:
                    l_chunk, batch_loss = got
            if not use_hooks:
                g_chunk, l_chunk = self._general_per_sample(theta, x, y)
                G[pos] = g_chunk
            ell[pos] = l_chunk.detach()
            self._check_per_sample_finite(G[pos], ell[pos], idx, pos)
            if self.reduction == "mean" and pos.stop - pos.start > 1:
                if batch_loss is None:
                    with torch.no_grad(), _math_attention():
                        batch_loss = self._batch_loss(theta, x, y)
                first = pos.start if idx is None else int(idx[pos.start])
                self._compare_batch_and_samples(batch_loss.detach(), ell[pos], first)
        return G, ell

    def _check_per_sample_finite(
        self, G: torch.Tensor, ell: torch.Tensor, idx: torch.Tensor | None, pos: slice
    ) -> None:
        bad = ~torch.isfinite(ell)
        if not bool(bad.any()):
            try:
                check_finite(G, "the per-sample gradients")  # cheap screen by the sum
                return
            except FloatingPointError:
                bad = ~torch.isfinite(G).all(dim=1)
        rows = bad.nonzero().flatten() + pos.start
        samples = (rows if idx is None else idx[rows]).tolist()
        shown = ", ".join(map(str, samples[:10])) + (", ..." if len(samples) > 10 else "")
        raise FloatingPointError(
            f"the per-sample losses or gradients: not finite (NaN/inf) for sample(s) {shown} "
            f"({len(samples)} of {self.num_samples} samples). If every target of such a sample is ignore_index "
            "(e.g. a sequence that is all padding), its loss is 0/0 in a token mean: drop those "
            "samples from the data. Otherwise check those inputs and the model's parameters for "
            "NaN/inf."
        )

    def _hooks_usable(self, method: str, at_current: bool) -> bool:
        """Whether the layer-hook path may be tried (static rules), else the reason is recorded."""
        why = None
        if self._hooks_state == "failed":
            why = self.routes.get("hooks", "its checks failed earlier on this problem")
        elif self.dtype not in (torch.float32, torch.float64):
            why = f"the hook path runs in float32/float64 only, the model is {self.dtype}"
        elif not at_current:
            why = "theta is not the model's current parameters"
        else:
            why = _hooks.unsupported_reason(self.model, self.param_names)
        if why is None:
            return True
        self.routes["per_sample"] = f"vmap: the layer-hook fast path does not apply ({why})"
        if method == "hooks":
            raise ValueError(
                f"method='hooks' cannot be used here: {why}. Use method='auto' or 'vmap'."
            )
        return False

    def _hooks_chunk(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, method: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hook-path gradients into ``out``; ``(losses, batch loss)``, or ``None`` (fall back)."""
        plan = _hooks.hook_plan(self.model, self.param_names)
        assert plan is not None
        n = _data.batch_size_of(x)
        names = {id(m): name for name, m in self.model.named_modules()}

        def total_loss(outputs: torch.Tensor) -> torch.Tensor:
            return self._reduce_outputs(outputs, y) * n

        with _math_attention():
            got = _hooks.per_sample_gradients_by_hooks(self.model, total_loss, plan, x, out, names)
        why: str | None = got if isinstance(got, str) else None
        if why is None:
            assert not isinstance(got, str)
            outputs = _map_tensors(torch.Tensor.detach, got[1])
            with torch.no_grad():
                losses = self._losses_from_outputs(outputs, y)
                batch_loss = self._reduce_outputs(outputs, y)
            if self._hooks_state == "unverified":
                why = self._verify_hooks(theta, x, y, out, losses)
        if why is not None:
            self._hooks_state = "failed"
            self.routes["hooks"] = why
            self.routes["per_sample"] = f"vmap: the layer-hook fast path does not apply ({why})"
            if method == "hooks":
                raise ValueError(
                    f"method='hooks' cannot be used here: {why}. Use method='auto' or 'vmap'."
                )
            return None
        self._hooks_state = "ok"
        self.routes.setdefault("per_sample", "layer hooks (assumptions verified)")
        return losses, batch_loss

    def _verify_hooks(
        self,
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        G: torch.Tensor,
        losses: torch.Tensor,
    ) -> str | None:
        """Check the hook path once: Σ_i G_i = ∇(Σ_i ℓ_i) per parameter, and row 0 alone."""
        rtol = _rtol(self.dtype)
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad(), _math_attention():
            n = _data.batch_size_of(x)
            (total,) = torch.autograd.grad(self._batch_loss(th, x, y) * n, th)
            first_loss = self._sample_loss(th, _row(x, 0), _row(y, 0))
            (first,) = torch.autograd.grad(first_loss, th)
            first_loss = first_loss.detach()
        got_sum = G.sum(0)
        bound = G.abs().sum(0)
        start = 0
        for name, size in zip(self.param_names, self.param_numels, strict=True):
            sl = slice(start, start + size)
            start += size
            err = float((got_sum[sl] - total[sl]).norm())
            if err > rtol * float(bound[sl].norm()) + 1e-300:
                return (
                    f"the per-sample gradients of {name} do not add up to its gradient (relative "
                    f"error {err / max(float(total[sl].norm()), 1e-300):.2g}): the parameter is "
                    "also used outside its layer (tied weights, a functional reuse, a penalty in "
                    "loss_fn)"
                )
        if abs(float(losses[0]) - float(first_loss)) > rtol * abs(float(first_loss)) + 1e-300:
            return (
                f"the first sample's loss computed alone ({float(first_loss):.6g}) differs from "
                f"its row of the batch ({float(losses[0]):.6g}): the model's outputs do not keep "
                "the batch on dimension 0, or the model mixes samples"
            )
        err = float((G[0] - first).norm())
        if err > rtol * (float(first.norm()) + float(G[0].norm())) + 1e-300:
            return (
                "the first sample's gradient computed alone differs from its hook-path row "
                f"(relative error {err / max(float(first.norm()), 1e-300):.2g}): the model mixes "
                "samples or does not keep the batch on dimension 0"
            )
        return None

    def _general_per_sample(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``vmap(grad)`` over the chunk, or a loop over samples where vmap has no rule."""
        with _math_attention():
            if self._vmap_ok is not False:
                try:
                    per_sample = vmap(grad_and_value(self._sample_loss), in_dims=(None, 0, 0))
                    g, ell = per_sample(theta, x, y)
                    self._vmap_ok = True
                    self.routes.setdefault("per_sample", "torch.func.vmap")
                    return g.detach(), ell.detach()
                except (RuntimeError, NotImplementedError) as exc:
                    if self._vmap_ok:
                        raise
                    self._vmap_failed(exc)
            n = _data.batch_size_of(x)
            if self._func_grad_ok:
                try:
                    one = grad_and_value(self._sample_loss)
                    rows = [one(theta, _row(x, i), _row(y, i)) for i in range(n)]
                except (RuntimeError, NotImplementedError) as exc:
                    self._func_grad_ok = False
                    self.routes["per_sample"] = (
                        f"a loop of ordinary backward passes: torch.func failed ({_first_line(exc)})"
                    )
            if not self._func_grad_ok:
                rows = [self._autograd_sample(theta, _row(x, i), _row(y, i)) for i in range(n)]
        return (
            torch.stack([r[0].detach() for r in rows]),
            torch.stack([r[1].detach() for r in rows]),
        )

    def _autograd_sample(
        self, theta: torch.Tensor, x: Any, y: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's gradient and loss by plain autograd (no torch.func transform)."""
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._sample_loss(th, x, y)
            (g,) = torch.autograd.grad(loss, th, allow_unused=True)
        return (torch.zeros_like(th) if g is None else g), loss.detach()

    def per_sample_losses(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample losses ``ℓ(x_i; θ)`` ``[n]``."""
        self._check_decoupled("per_sample_losses")
        idx = self.check_indices(indices)
        theta = (self.theta() if theta is None else theta).detach()
        with torch.no_grad():
            rows = self.plan_rows("forward")
            parts = [self.sample_losses(theta, x, y) for x, y, _ in self.chunks(idx, rows)]
        return torch.cat(parts)

    def batched_loss(
        self, thetas: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``L(θ_j)`` for a batch of parameter vectors ``thetas`` ``[B, D]`` → ``[B]``.

        Vmapped over the parameter vectors; a loop over them for layers without a batching rule.
        """
        self._check_decoupled("batched_loss")
        if thetas.ndim != 2 or thetas.shape[1] != self.dim:
            raise ValueError(f"thetas must have shape [B, {self.dim}], got {list(thetas.shape)}")
        with torch.no_grad(), _math_attention():
            try:  # all vectors at once must fit one sample; else one vector at a time
                rows: int | None = self.plan_rows("batched", thetas.shape[0])
            except MemoryError:
                rows = None
            if self._batched_theta_ok is not False and rows is not None:
                many = vmap(self._batch_loss, in_dims=(0, None, None))
                try:
                    out = self.reduce_mean(lambda x, y: many(thetas, x, y), indices, rows=rows)
                    self._batched_theta_ok = True
                    return out
                except (RuntimeError, NotImplementedError) as exc:
                    if self._batched_theta_ok:
                        raise
                    self._batched_theta_ok = False
                    self.routes["batched_loss"] = (
                        f"a loop over parameter vectors: vmap failed ({_first_line(exc)})"
                    )
            return torch.stack(
                [
                    self.reduce_mean(
                        lambda x, y, th=th: self._batch_loss(th, x, y),
                        indices,
                        rows=self.plan_rows("forward"),
                    )
                    for th in thetas
                ]
            )


def per_sample_gradients(
    problem: Problem, indices: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """Per-sample gradients ``[n, D]``: row i is ``∇_θ ℓ(x_i; θ)`` at the model's current θ.

    Computed in chunks sized by the problem's memory budget (and ``problem.chunk_size``), so
    memory stays bounded; see :meth:`Problem.per_sample_gradients` for the routes. Models whose forward couples samples (BatchNorm in
    training mode) or is random (dropout in training mode) are refused with an error.

    Args:
        problem: the :class:`Problem`.
        indices: sample indices (any order, repeats allowed); ``None`` means all N samples.
    """
    return problem.per_sample_gradients(indices)
