"""The state and the functional loss of a :class:`~sgdnoise.problem.Problem`: flat parameters,
model outputs, losses, the one reduction over samples, and the memory budget that sizes chunks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .. import _data
from .._utils import check_finite
from ._dist import Shard
from ._helpers import (
    FREE_MEMORY_FRACTION,
    PER_SAMPLE_CHUNK_NUMBERS,
    LossFn,
    _coupling_modules,
    _first_line,
    _gib,
    _math_attention,
    _slice,
    _tensors,
    _unsqueeze,
    free_memory,
    raise_if_out_of_memory,
)


class ProblemBase:
    """Flat parameters, functional loss, reduction and memory budget of a problem (see
    :class:`~sgdnoise.problem.Problem`, which adds construction, per-sample passes and Hessian
    products)."""

    model: nn.Module
    loss_fn: LossFn
    reduction: str
    param_names: list[str]
    param_shapes: list[torch.Size]
    param_numels: list[int]
    dtype: torch.dtype
    device: torch.device
    dim: int
    num_samples: int
    chunk_size: int | None
    routes: dict[str, str]
    _source: Any
    _budget_arg: int | None
    _budget: int | None
    _footprint_bytes: tuple[float, float] | None
    _vmap_ok: bool | None
    _shard: Shard | None
    #: Problem's: this rank's shard as a one-process problem (declared for the mixins).
    local_shard: Callable[[], ProblemBase]

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
        if self._shard is not None:  # global indices of this rank's shard
            local = self._shard.split(idx)[1]
            assert local is not None
            if local.numel() != idx.numel():
                raise IndexError(
                    f"take: rank {self._shard.rank} holds the samples "
                    f"[{self._shard.offset}, {self._shard.offset + self._shard.local - 1}] of this "
                    "sharded problem; the indices asked for include samples of other ranks"
                )
            idx = local
        return self._source.take(idx)

    # ------------------------------------------------------------------ flat parameters
    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, D={self.dim}, N={self.num_samples}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The model's trainable parameters in θ's order (the tensors themselves, not copies).

        Raises:
            RuntimeError: a parameter was removed, converted or moved since the problem was built.
        """
        params = dict(self.model.named_parameters())
        try:
            found: list[torch.Tensor] = [params[n] for n in self.param_names]
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
        return self.flatten([p.detach() for p in self.trainable_parameters()])

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
        self.check_vector(theta, "theta")
        with torch.no_grad():
            for p, piece in zip(
                self.trainable_parameters(), self.unflatten(theta).values(), strict=True
            ):
                p.copy_(piece)

    def check_vector(self, v: torch.Tensor, what: str) -> None:
        """Raise ``ValueError`` unless ``v`` is a flat ``[D]`` tensor of the model's dtype and device
        (the message names ``what``)."""
        if not isinstance(v, torch.Tensor) or v.shape != (self.dim,):
            shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{what} must be a flat vector of shape [{self.dim}], got {shape}")
        self._check_kind(v, what)

    def _check_kind(self, t: torch.Tensor, what: str) -> None:
        """Raise ``ValueError`` unless ``t`` has the model's dtype and device."""
        if t.dtype != self.dtype or t.device != self.device:
            raise ValueError(
                f"{what} must be {self.dtype} on {self.device} (the model's), got {t.dtype} on "
                f"{t.device}; cast it with .to(problem.dtype) or move it with .to(problem.device)"
            )

    def point(self, theta: torch.Tensor | None) -> torch.Tensor:
        """``theta`` checked (a flat ``[D]`` tensor of the model's dtype and device) and detached,
        or the current parameters for ``None``.

        Raises:
            ValueError: another shape, dtype or device (the message says which).
        """
        if theta is None:
            return self.theta()
        self.check_vector(theta, "theta")
        return theta.detach()

    def check_directions(self, V: torch.Tensor, what: str = "V") -> None:
        """Raise ``ValueError`` unless ``V`` is ``[D]`` or ``[D, k]`` in the model's dtype and on
        its device (a float32 ``V`` on a float64 model would silently give float32 products)."""
        if not isinstance(V, torch.Tensor) or V.ndim not in (1, 2) or V.shape[0] != self.dim:
            shape = list(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"{what} must have shape [{self.dim}] or [{self.dim}, k], got {shape}")
        self._check_kind(V, what)

    # ------------------------------------------------------------------ functional loss
    def check_decoupled(self, what: str) -> None:
        """Refuse a model whose training-mode forward couples samples or is random.

        Args:
            what: the quantity asked for (named in the message).

        Raises:
            RuntimeError: BatchNorm or dropout (p > 0) is in training mode; says to call
                ``model.eval()``.
        """
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
        return [id(p) for p in self.trainable_parameters()]

    def outputs(self, theta: torch.Tensor, x: Any) -> Any:
        """The model's outputs on the batch ``x`` at the flat parameters ``theta`` ``[D]``.

        Differentiable in ``theta`` (``torch.func.functional_call``; works under ``jvp``, ``vjp``,
        ``vmap``); buffers and parameters outside θ are constants.

        Raises:
            RuntimeError: the model changes one of its parameters in place inside forward.
        """
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

    def batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of the batch ``(x, y)`` at ``theta`` ``[D]`` (a scalar, differentiable)."""
        return self._reduce_outputs(self.outputs(theta, x), y)

    def _loss_at(self, theta: torch.Tensor) -> Callable[[Any, Any], torch.Tensor]:
        """``(x, y) ↦`` the mean loss of the batch at ``theta`` (for :meth:`reduce_mean`)."""
        return lambda x, y: self.batch_loss(theta, x, y)

    def _sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.batch_loss(theta, _unsqueeze(x), _unsqueeze(y))

    def _losses_from_outputs(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[n]`` from a batch's outputs (``loss_fn`` on each sample's rows)."""
        if self.reduction == "none":
            return self.loss_fn(out, y)
        if self._vmap_ok is not False:
            try:
                return vmap(lambda o, t: self.loss_fn(_unsqueeze(o), _unsqueeze(t)))(out, y)
            except (RuntimeError, NotImplementedError) as exc:
                raise_if_out_of_memory(exc)
                pass
        return torch.stack(
            [
                self.loss_fn(_slice(out, i), _slice(y, i))
                for i in range(_data.batch_size_of(y, "targets"))
            ]
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
        """Consecutive ``(x, y, positions)`` pieces of at most ``chunk_size`` selected samples.

        In a sharded problem (``process_group``), the pieces of *this rank's* part of the
        selection (``indices`` are global), positions counted within that part.
        """
        if self._shard is not None:
            indices = self._shard.split(indices)[1]
            if indices is not None and indices.numel() == 0:
                return iter(())
        return self._source.chunks(indices, chunk_size or self.chunk_size)

    def _first_sample(self) -> Any:
        """The inputs of this rank's first sample, as a batch of one (shapes, module diagnoses)."""
        return self._source.take(torch.arange(1, device=self.device))[0]

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
            w = (pos.stop - pos.start) / n
            part = fn(x, y) if w == 1.0 else fn(x, y) * w  # one chunk: no weighted copy
            total = part if total is None else total.add_(part)  # in place: one block less
        if self._shard is None:
            assert total is not None
            return total
        if total is None:  # this rank holds none of the selection: its share is 0 (same shape)
            total = torch.zeros_like(fn(*self._source.take(torch.arange(1, device=self.device))))
        return self._shard.all_reduce(total)

    # ------------------------------------------------------------------ loss, gradient, HVP
    def loss(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``L(θ) = (1/n) Σ_i ℓ(x_i; θ)`` over all (or the selected) samples, at θ (default: current).

        Raises:
            ValueError: ``theta`` that is not ``[D]`` in the model's dtype and on its device.
        """
        self.check_decoupled("Problem.loss")
        theta = self.point(theta)
        with torch.no_grad():
            value = self.reduce_mean(
                lambda x, y: self.batch_loss(theta, x, y), indices, rows=self.plan_rows("forward")
            )
        check_finite(value, "the loss")
        return value

    def loss_and_gradient(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(θ), ∇L(θ))`` with one forward and one backward pass per chunk.

        Raises:
            ValueError: ``theta`` that is not ``[D]`` in the model's dtype and on its device.
        """
        self.check_decoupled("Problem.gradient")
        theta = self.point(theta)

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            th = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self.batch_loss(th, x, y)
                (g,) = torch.autograd.grad(loss, th)
            return torch.cat([loss.detach().reshape(1), g])

        both = self.reduce_mean(fn, indices)
        check_finite(both[:1], "the loss")
        check_finite(both[1:], "the gradient")
        return both[0], both[1:]

    def gradient(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``∇L(θ)`` ``[D]`` (mean over samples).

        Raises:
            ValueError: ``theta`` that is not ``[D]`` in the model's dtype and on its device.
        """
        return self.loss_and_gradient(theta, indices)[1]

    # ------------------------------------------------------------------ per-sample quantities
    def per_sample_chunk_size(self) -> int:
        """Samples per chunk of a per-sample gradient pass: within the memory budget and at most
        ``PER_SAMPLE_CHUNK_NUMBERS`` (2^25) numbers per ``[chunk, D]`` block."""
        # within the memory budget, and never more than PER_SAMPLE_CHUNK_NUMBERS numbers per chunk
        # (a chunk is a transient buffer; the materialised [N, D] matrix has its own rule)
        return max(
            1, min(self.plan_rows("per_sample"), PER_SAMPLE_CHUNK_NUMBERS // max(1, self.dim))
        )

    # ------------------------------------------------------------------ memory budget
    #: Bytes the running estimators hold in their own blocks (see :meth:`holding`).
    _held_bytes: int = 0

    @property
    def memory_budget(self) -> int:
        """Bytes one pass may use (the argument, or half the free memory at the first pass)."""
        if self._budget is None:
            self._budget = int(free_memory(self.device) * FREE_MEMORY_FRACTION)
        return self._budget

    @contextlib.contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """While inside, ``nbytes`` held by an estimator (Hutch++ probes, a Lanczos basis: its
        ``[D, m]`` blocks) count against the budget of every pass, so that the estimator's peak —
        its blocks plus one pass — stays near :attr:`memory_budget` rather than above it (a
        ResNet-18's alignment reached 11 GB with a 6 GB budget before). See
        :meth:`pass_budget`. Nested holds add up."""
        n = max(0, int(nbytes))
        self._held_bytes += n
        try:
            yield
        finally:
            self._held_bytes -= n

    def pass_budget(self) -> int:
        """Bytes one pass may use now: :attr:`memory_budget` less what estimators hold
        (:meth:`holding`), and never less than a quarter of the budget (a pass must run; the
        estimator's blocks are then over the budget, not the pass)."""
        budget = self.memory_budget
        return max(budget // 4, budget - self._held_bytes)

    def _footprint(self) -> tuple[float, float]:
        """``(fixed, per_sample)`` bytes saved for backward by a forward pass with gradients,
        measured once on one and two samples (saved tensors, counted once per storage)."""
        if self._footprint_bytes is not None:
            return self._footprint_bytes
        sizes = []
        for n in (1, 2) if self.num_samples >= 2 else (1,):
            x, y = self._source.take(torch.arange(n))
            seen: dict[int, int] = {}
            th = self.theta().requires_grad_(True)
            own = th.untyped_storage().data_ptr()  # θ itself: a fixed cost, counted below

            def pack(t: torch.Tensor, seen: dict[int, int] = seen, own: int = own) -> torch.Tensor:
                try:
                    st = t.untyped_storage()
                    if st.data_ptr() != own:
                        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
                except (RuntimeError, NotImplementedError) as exc:  # e.g. tensors without storage
                    raise_if_out_of_memory(exc)
                    seen[id(t)] = t.numel() * t.element_size()
                return t

            data = sum(t.numel() * t.element_size() for t in _tensors((x, y)))
            try:
                with (
                    torch.enable_grad(),
                    _math_attention(),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                ):
                    self.batch_loss(th, x, y)
            except Exception:  # the model's errors surface in the real pass, not here
                seen = {}
            sizes.append(float(sum(seen.values()) + data))
        # The floor of a quarter of one sample's activations guards a two-sample difference
        # that understates; θ's own storage (saved by every layer's backward, one [D] vector)
        # is fixed, not per sample: in the floor it made a 9.2M-parameter VGG-11 cost 10 MB
        # per sample instead of its 1 MB of activations, and its Hessian products 2 chunks.
        d = self.dim * torch.finfo(self.dtype).bits // 8
        if len(sizes) == 2:
            per = max(sizes[1] - sizes[0], sizes[0] / 4, 1.0)
            fixed = max(sizes[0] - per, 0.0) + d
        else:
            per, fixed = max(sizes[0], 1.0), float(d)
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
        if kind == "double_backward":  # gradient graph kept (create_graph), one column's pass;
            # the block's columns: V, the products, the chunk's weighted share and the running sum
            return 5 * a0 + (4 * columns + 4) * d, 5 * a1
        if kind == "double_backward_batched":  # the backward of the gradient vmapped over columns
            c = 3 + 2 * columns
            return c * a0 + (4 * columns + 2) * d, c * a1
        if kind == "per_sample":
            return a0 + 2 * d, 2 * a1 + 3 * d
        if kind == "batched":  # `columns` parameter vectors at once, no gradients
            return columns * (a0 + d), columns * a1
        raise ValueError(f"unknown pass kind {kind!r}")

    def plan_rows(self, kind: str, columns: int = 1) -> int:
        """Samples per chunk for a pass of ``kind`` (``"forward"``, ``"gradient"``, ``"hvp"``,
        ``"double_backward"``, ``"double_backward_batched"``, ``"per_sample"``, ``"batched"``)
        with ``columns`` products/vectors at once, so that its estimated peak stays under
        :attr:`memory_budget` (and at most ``chunk_size``).

        Raises:
            MemoryError: if one sample does not fit, with the bytes it needs.
        """
        fixed, per = self._cost(kind, columns)
        budget = self.pass_budget()
        if fixed + per > budget:
            held = self.memory_budget - budget
            raise MemoryError(
                f"a {kind} pass of this model needs about {_gib(fixed + per)} for one sample"
                + (f" and {columns} columns" if columns > 1 else "")
                + f", more than the memory budget of {_gib(budget)}"
                + (f" (after {_gib(held)} held by the estimator's own blocks)" if held else "")
                + ". Raise memory_budget "
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
            if fixed + per * min(self.num_samples, 8) <= self.pass_budget():
                break
            cols //= 2
        return cols, self.plan_rows(kind, cols)
