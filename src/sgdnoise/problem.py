"""A model, a loss and a data set, seen as a function of one flat parameter vector θ ∈ R^D.

Conventions (followed everywhere in sgdnoise):

* **Flat parameter order.** θ is the concatenation of ``[p for p in model.parameters() if
  p.requires_grad]``, each flattened row-major (``p.reshape(-1)``), in that order. Frozen parameters
  and buffers are constants.
* **Loss.** ``loss_fn(outputs, targets)`` returns the *mean* loss over a batch (like
  ``F.cross_entropy``), so ``L(θ) = (1/N) Σ_i ℓ(x_i; θ)`` over all N samples and
  ``ℓ(x_i; θ) = loss_fn(model(x_i[None]), y_i[None])``.
* **Evaluation point.** Every quantity is evaluated at the model's *current* parameters (read
  anew at each call, so training the model in between is fine); dtype and device follow the model.
* **Reductions.** Every average over samples (loss, gradient, Hessian products, sums in
  estimators) goes through :meth:`Problem.reduce_mean`, chunk by chunk, each chunk weighted by its
  size. This is the one place a later version shards over processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from . import _per_sample as _hooks
from ._utils import check_finite

__all__ = ["Problem", "per_sample_gradients"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Per-sample gradient chunks hold chunk × D numbers; keep them near 32M entries by default.
_PER_SAMPLE_BUDGET = 2**25


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
        inputs: tensor ``[N, ...]``; floating inputs are cast to the model's dtype and moved to its
            device.
        targets: tensor ``[N, ...]`` (class indices, regression targets, ...), moved to the model's
            device; floating targets are cast to the model's dtype.
        chunk_size: largest number of samples processed at once by every pass over the data
            (``None``: all N at once for losses and Hessian products, and an automatic size for
            per-sample gradients, about 32M numbers per chunk).

    Raises:
        ValueError: if the model has no trainable parameters, inputs and targets differ in length,
            or ``chunk_size`` is not positive.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets) -> mean loss")
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                "inputs and targets must be tensors with the sample dimension first, got "
                f"{type(inputs).__name__} and {type(targets).__name__}"
            )
        if inputs.ndim == 0 or targets.ndim == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                "inputs and targets must have the same number of samples along dimension 0, got "
                f"inputs of shape {list(inputs.shape)} and targets of shape {list(targets.shape)}"
            )
        if inputs.shape[0] == 0:
            raise ValueError("the data set is empty (N = 0); pass at least one sample")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

        self.model = model
        self.loss_fn = loss_fn
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True); θ would be empty"
            )
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
        self.dim: int = sum(self.param_numels)
        self.inputs = inputs.to(self.device, self.dtype if inputs.is_floating_point() else None)
        self.targets = targets.to(self.device, self.dtype if targets.is_floating_point() else None)
        self.num_samples: int = int(inputs.shape[0])
        self.chunk_size = chunk_size
        self._forward_mode_ok = True

    # ------------------------------------------------------------------ flat parameters
    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, D={self.dim}, N={self.num_samples}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def _trainable(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.param_names]

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
        state = {n: b for n, b in self.model.named_buffers()}
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                state[n] = p
        state.update(self.unflatten(theta))
        return state

    def _batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self._state(theta), (x,))
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar mean loss over the batch, got {shape}. Use a mean "
                "reduction (e.g. F.cross_entropy(out, y) with reduction='mean')."
            )
        return loss

    def _sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._batch_loss(theta, x.unsqueeze(0), y.unsqueeze(0))

    # ------------------------------------------------------------------ the one reduction
    def check_indices(self, indices: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
        """Validate sample indices (``None`` = all samples) and return them as a long tensor."""
        if indices is None:
            return None
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device).reshape(-1)
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
    ) -> list[tuple[torch.Tensor, torch.Tensor, slice]]:
        """Split the (selected) data into ``(x, y, positions)`` chunks of at most ``chunk_size``."""
        n = self.num_samples if indices is None else int(indices.numel())
        size = chunk_size or self.chunk_size or n
        out = []
        for start in range(0, n, size):
            pos = slice(start, min(n, start + size))
            if indices is None:
                out.append((self.inputs[pos], self.targets[pos], pos))
            else:
                sel = indices[pos]
                out.append((self.inputs[sel], self.targets[sel], pos))
        return out

    def reduce_mean(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Σ_c (n_c / n) · fn(x_c, y_c)`` over chunks c of the (selected) data.

        ``fn`` returns a *mean* over its chunk; each chunk is weighted by its size, so the result
        is the exact mean over all selected samples whatever the chunking.
        """
        indices = self.check_indices(indices)
        n = self.num_samples if indices is None else int(indices.numel())
        total: torch.Tensor | None = None
        for x, y, pos in self.chunks(indices):
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
            value = self.reduce_mean(lambda x, y: self._batch_loss(theta, x, y), indices)
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
        max_columns: int = 16,
    ) -> torch.Tensor:
        """Hessian products ``∇²L(θ) V`` for ``V`` of shape ``[D, k]``.

        Forward-over-reverse (``vmap`` over ``jvp(grad(L))``): the primal forward/backward is
        shared by all columns and only the tangents are batched, ``max_columns`` at a time to
        bound memory. Falls back to batched double backward for operations without forward-mode
        derivatives.
        """
        self._check_decoupled("Hessian-vector products")
        theta = (self.theta() if theta is None else theta).detach()

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            blocks = [
                self._hvp_block(theta, V[:, j : j + max_columns], x, y)
                for j in range(0, V.shape[1], max_columns)
            ]
            return torch.cat(blocks, dim=1)

        out = self.reduce_mean(fn, indices)
        check_finite(out, "a Hessian-vector product")
        return out

    def _hvp_block(
        self, theta: torch.Tensor, V: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        if self._forward_mode_ok:
            g = grad(lambda t: self._batch_loss(t, x, y))
            try:
                # "+ 0 * v" keeps the output batched when H = 0 (a loss linear in θ).
                return vmap(lambda v: jvp(g, (theta,), (v,))[1] + 0 * v, in_dims=1, out_dims=1)(V)
            except (NotImplementedError, RuntimeError) as exc:
                if "forward" not in str(exc).lower() and "jvp" not in str(exc).lower():
                    raise
                self._forward_mode_ok = False  # e.g. an op without a forward-mode derivative
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._batch_loss(th, x, y)
            (g,) = torch.autograd.grad(loss, th, create_graph=True)
            if not g.requires_grad:  # the loss is linear in θ: H = 0
                return torch.zeros_like(V)
            if V.shape[1] == 1:
                (hv,) = torch.autograd.grad(g, th, grad_outputs=V[:, 0])
                return hv[:, None]
            (hv,) = torch.autograd.grad(g, th, grad_outputs=V.T, is_grads_batched=True)
        return hv.T

    # ------------------------------------------------------------------ per-sample quantities
    def _per_sample_chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, min(self.num_samples, _PER_SAMPLE_BUDGET // max(1, self.dim)))

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
            method: ``"vmap"`` (``torch.func.vmap(grad(...))``, any model), ``"hooks"`` (one
                forward and one backward pass with layer hooks; models whose trainable parameters
                all belong to ``nn.Linear``/``nn.Conv2d`` layers, at the current parameters), or
                ``"auto"`` (hooks where possible, else vmap).
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
        """
        if method not in ("auto", "vmap", "hooks"):
            raise ValueError(f"method must be 'auto', 'vmap' or 'hooks', got {method!r}")
        self._check_decoupled("per_sample_gradients")
        idx = self.check_indices(indices)
        current = self.theta()
        theta = current if theta is None else theta.detach()
        plan = _hooks.hook_plan(self.model, self.param_names) if method != "vmap" else None
        at_current = theta is current or torch.equal(theta, current)
        if method == "hooks" and (plan is None or not at_current):
            raise ValueError(
                "method='hooks' needs every trainable parameter to be the weight/bias of an "
                "nn.Linear or nn.Conv2d (groups=1, zero padding) layer and theta to be the model's "
                "current parameters; use method='vmap' for other models"
            )
        per_sample = vmap(grad_and_value(self._sample_loss), in_dims=(None, 0, 0))
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
            got = None
            if plan is not None and at_current:
                got = _hooks.per_sample_gradients_by_hooks(
                    self.model, self.loss_fn, plan, x, y, out=G[pos]
                )
            if got is None:
                g_chunk, l_chunk = per_sample(theta, x, y)
                G[pos] = g_chunk.detach()
            else:
                l_chunk = got[1]
            ell[pos] = l_chunk.detach()
        check_finite(G, "the per-sample gradients")
        check_finite(ell, "the per-sample losses")
        return G, ell

    def per_sample_losses(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample losses ``ℓ(x_i; θ)`` ``[n]``."""
        self._check_decoupled("per_sample_losses")
        idx = self.check_indices(indices)
        theta = (self.theta() if theta is None else theta).detach()
        per_sample = vmap(self._sample_loss, in_dims=(None, 0, 0))
        with torch.no_grad():
            parts = [per_sample(theta, x, y) for x, y, _ in self.chunks(idx)]
        return torch.cat(parts)

    def batched_loss(
        self, thetas: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``L(θ_j)`` for a batch of parameter vectors ``thetas`` ``[B, D]`` → ``[B]`` (vmapped)."""
        self._check_decoupled("batched_loss")
        if thetas.ndim != 2 or thetas.shape[1] != self.dim:
            raise ValueError(f"thetas must have shape [B, {self.dim}], got {list(thetas.shape)}")
        many = vmap(self._batch_loss, in_dims=(0, None, None))
        with torch.no_grad():
            return self.reduce_mean(lambda x, y: many(thetas, x, y), indices)


def per_sample_gradients(
    problem: Problem, indices: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """Per-sample gradients ``[n, D]``: row i is ``∇_θ ℓ(x_i; θ)`` at the model's current θ.

    Computed with ``torch.func.vmap(grad(...))`` in chunks (``problem.chunk_size``, or about 32M
    numbers per chunk), so memory stays bounded. Models whose forward couples samples (BatchNorm in
    training mode) or is random (dropout in training mode) are refused with an error.

    Args:
        problem: the :class:`Problem`.
        indices: sample indices (any order, repeats allowed); ``None`` means all N samples.
    """
    return problem.per_sample_gradients(indices)
