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
  size.
* **Several processes.** Inside ``torch.distributed`` (e.g. ``torchrun``), each rank passes its own
  shard of the data and the problem is the concatenation of the shards in rank order (sample i of
  rank r has the global index ``offset_r + i``): :meth:`Problem.reduce_mean` all-reduces its
  count-weighted sum once per pass, per-sample passes gather their rows, and everything else (θ,
  generators, Lanczos state) is replicated, so every result is the one-process result up to the
  order of floating-point sums (see :mod:`sgdnoise.problem._dist`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import _data
from ._base import ProblemBase
from ._dist import Shard, local_range, resolve_group
from ._helpers import (
    FREE_MEMORY_FRACTION,
    MAX_COLUMNS,
    PER_SAMPLE_CHUNK_NUMBERS,
    LossFn,
    ParamSpec,
    _select_parameters,
    free_memory,
    parse_memory,
)
from ._hessian import HessianProducts
from ._jacobian import OutputJacobian
from ._samples import PerSampleQuantities

__all__ = [
    "FREE_MEMORY_FRACTION",
    "MAX_COLUMNS",
    "PER_SAMPLE_CHUNK_NUMBERS",
    "LossFn",
    "ParamSpec",
    "Problem",
    "ProblemBase",
    "free_memory",
    "local_range",
    "parse_memory",
    "per_sample_gradients",
]


def _check_model_and_loss(model: Any, loss_fn: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> mean loss")


class Problem(HessianProducts, PerSampleQuantities, OutputJacobian):
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
            one sample raises ``MemoryError`` saying how much it needs. The estimators' own
            ``[D, m]`` blocks (Hutch++ sketches, Lanczos bases) count against it while they run
            (:meth:`holding`): their passes get the rest, at least a quarter of the budget.
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
        process_group: shard the data over the ranks of a ``torch.distributed`` group. ``None``
            (default): the default group when ``torch.distributed`` is initialised with more than
            one rank, else a one-process problem (no ``torch.distributed`` call is made); a group:
            that group; ``False``: a one-process problem on every rank. Sharded, each rank passes
            *its own* samples (shard sizes may differ, none empty) and every rank must make the
            same calls in the same order (they hold collectives); sample indices are global
            (``offset + local index``, ``offset`` the earlier ranks' sizes), ``num_samples`` is the
            total N, and :meth:`take`, :attr:`inputs` and :attr:`targets` see this rank's shard.
            Set a ``timeout`` in ``init_process_group`` so that a failing rank stops the others.

    Attributes:
        routes: ``{quantity: how it is computed}`` for quantities whose fast route did not apply to
            this model (e.g. ``"per_sample"``, ``"hvp"``), with the reason.

    Raises:
        ValueError: if the model has no trainable parameters, inputs and targets differ in length,
            ``chunk_size`` is not positive, or the loss is not a mean over samples (e.g.
            ``reduction='sum'``), with what to change; a rank holds no samples.
        RuntimeError: a ``process_group`` was given without ``torch.distributed`` initialised.
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
        process_group: Any = None,
    ) -> None:
        _check_model_and_loss(model, loss_fn)
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
        named: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
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
        self._connect(process_group)

    def _connect(self, process_group: Any) -> None:
        """Join the ranks of the process group (see ``process_group``), if any: one all-gather of
        every rank's sample count, memory budget and per-sample footprint; every rank then plans
        its chunks with the smallest budget and the largest footprint, so that all take the same
        decisions (and call the same collectives)."""
        self._process_group = process_group
        self._shard: Shard | None = None
        group = resolve_group(process_group)
        if group is None:
            return
        budget = self._budget
        if budget is None:
            budget = int(free_memory(self.device) * FREE_MEMORY_FRACTION)
        fixed, per = self._footprint()
        mine = [budget, fixed, per, *self._identity()]
        shard, stats = Shard.connect(group, self.num_samples, mine, self.device)
        self._check_same_model(shard, [r[3:] for r in stats])
        self._shard = shard
        self.num_samples = shard.total
        self._budget = int(min(r[0] for r in stats))
        self._footprint_bytes = (max(r[1] for r in stats), max(r[2] for r in stats))

    def _identity(self) -> list[float]:
        """``[D, dtype code, fingerprint of θ]``: what must be equal on every rank (the
        fingerprint: 48 bits of a SHA-1 of θ's bytes, exact in float64)."""
        raw = self.theta().detach().cpu().contiguous().view(torch.uint8)
        digest = hashlib.sha1(raw.numpy().tobytes())
        code = [torch.float64, torch.float32, torch.float16, torch.bfloat16].index(self.dtype)
        return [float(self.dim), float(code), float(int.from_bytes(digest.digest()[:6], "big"))]

    @staticmethod
    def _check_same_model(shard: Shard, rows: list[list[float]]) -> None:
        """Every rank must hold the same parameters (count, dtype, values).

        Raises:
            ValueError: on every rank, naming the first rank that differs from rank 0.
        """
        what = ("number of parameters D", "dtype", "parameter values θ")
        for r, row in enumerate(rows):
            for i, name in enumerate(what):
                if row[i] != rows[0][i]:
                    detail = f" ({int(rows[0][i])} vs {int(row[i])})" if i == 0 else ""
                    raise ValueError(
                        f"the ranks of a sharded problem must hold the same model: rank {r}'s "
                        f"{name} differs from rank 0's{detail}. Build the same model on every "
                        "rank (same seed, or broadcast rank 0's weights with "
                        "torch.distributed.broadcast) before sgdnoise.Problem; only the data is "
                        "sharded"
                    )

    @property
    def shard(self) -> Shard | None:
        """This rank's place in a sharded problem (sizes, offset, collectives), or ``None``."""
        return self._shard

    def _rebuild(
        self, model: nn.Module | None = None, source: Any = None, **changes: Any
    ) -> Problem:
        """A problem with the same loss (and, unless given, model and data) and the same
        construction arguments but ``changes``."""
        kwargs: dict[str, Any] = {
            "chunk_size": self.chunk_size,
            "reduction": self.reduction,
            "params": list(self.param_names),
            "memory_budget": self._budget_arg,
            "process_group": self._process_group,
        }
        kwargs.update(changes)
        model = self.model if model is None else model
        return Problem(
            model, self.loss_fn, self._source if source is None else source, None, **kwargs
        )

    def local_shard(self) -> Problem:
        """This rank's shard as a one-process problem (same model, loss, parameter block and
        memory budget; no collectives): its N is this rank's sample count and its sample ``i`` is
        global sample ``shard.offset + i``. On a problem that is not sharded, an equal problem.
        For work that is per rank by nature (e.g. :func:`sgdnoise.check` of this rank's data)."""
        return self._rebuild(memory_budget=self._budget, process_group=False)

    def restrict(self, params: ParamSpec) -> Problem:
        """The same model, loss and data with θ restricted to a block of parameters (see
        ``params`` in :class:`Problem`); the other parameters are held fixed."""
        return self._rebuild(params=params)

    def with_dtype(self, dtype: torch.dtype) -> Problem:
        """The same loss, data, parameter block and budget on a copy of the model in ``dtype`` at
        the same (cast) weights; the caller's model is untouched (e.g. a float32 twin of a 16-bit
        model for measurements whose rounding 16 bits cannot carry)."""
        model = copy.deepcopy(self.model).to(dtype)
        return self._rebuild(model=model, source=self._source.recast(self.device, dtype))


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

    Returns:
        ``[n, D]`` in the model's dtype and device (gradient of the per-sample loss, θ's order).

    Raises:
        RuntimeError: BatchNorm/dropout in training mode. FloatingPointError: a NaN/inf per-sample
        loss or gradient (the samples are named).
    """
    return problem.per_sample_gradients(indices)
