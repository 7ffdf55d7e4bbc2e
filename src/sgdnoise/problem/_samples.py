"""Per-sample quantities of a :class:`~sgdnoise.problem.Problem`: per-sample losses and
gradients (vmap, layer hooks or a loop), Jacobian products of the per-sample losses, batched
losses over many parameter vectors, and the loss-convention checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad_and_value, jvp, vjp, vmap

from .. import _data
from .. import _per_sample as _hooks
from .._utils import check_finite
from ._base import ProblemBase
from ._helpers import (
    _coupling_modules,
    _first_line,
    _map_tensors,
    _math_attention,
    _row,
    _rtol,
    map_columns,
    raise_if_out_of_memory,
)


class PerSampleQuantities(ProblemBase):
    """Per-sample losses, gradients and Jacobian products for :class:`~sgdnoise.problem.Problem`
    (mixin)."""

    _batched_theta_ok: bool | None
    _hooks_state: str
    _losses_jvp_mode: str
    _func_grad_ok: bool
    _losses_jvp_checked: bool

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
                return self.loss_fn(self.outputs(theta, x), y)
            if self._vmap_ok is not False:
                try:
                    out = vmap(self._sample_loss, in_dims=(None, 0, 0))(theta, x, y)
                    self._vmap_ok = True
                    return out
                except (RuntimeError, NotImplementedError) as exc:
                    raise_if_out_of_memory(exc)
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
                out = map_columns(lambda v: jvp(f, (theta,), (v,))[1], V)
                if self._losses_jvp_checked:
                    return out
                self._losses_jvp_checked = True
                ref = self._losses_jvp_reverse(f, theta, x, y, V[:, :1])
                err = float((out[:, :1] - ref).norm())
                if err <= _rtol(self.dtype) * float(ref.norm() + out[:, :1].norm()) + 1e-300:
                    return out
                why = "forward-mode rules disagree with the backward (e.g. Embedding(padding_idx))"
            except (RuntimeError, NotImplementedError) as exc:
                raise_if_out_of_memory(exc)
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
                raise_if_out_of_memory(exc)
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
                out = self.outputs(theta, x)
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
            ValueError: ``theta`` that is not ``[D]`` in the model's dtype and on its device.
            FloatingPointError: a per-sample loss or gradient is NaN/inf; the message names the
                samples (and the usual cause: a sample whose targets are all ``ignore_index``).
        """
        if method not in ("auto", "vmap", "hooks"):
            raise ValueError(f"method must be 'auto', 'vmap' or 'hooks', got {method!r}")
        self.check_decoupled("per_sample_gradients")
        idx = self.check_indices(indices)
        current = self.theta()
        theta = current if theta is None else self.point(theta)
        at_current = theta is current or torch.equal(theta, current)
        use_hooks = method != "vmap" and self._hooks_usable(method, at_current)
        size = self.per_sample_chunk_size()
        n = self.num_samples if idx is None else int(idx.numel())
        gather_into = None
        if self._shard is not None:  # this rank's rows of the selection, gathered at the end
            gather_into, out, n = out, None, self._shard.count_here(idx)
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
                        batch_loss = self.batch_loss(theta, x, y)
                first = pos.start if idx is None else int(idx[pos.start])
                self._compare_batch_and_samples(batch_loss.detach(), ell[pos], first)
        if self._shard is not None:
            return self._gather_per_sample(idx, G, ell, gather_into)
        return G, ell

    def _gather_per_sample(
        self, idx: torch.Tensor | None, G: torch.Tensor, ell: torch.Tensor, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's rows of a per-sample pass, gathered in selection order (one collective)."""
        assert self._shard is not None
        n = self._shard.count(idx)
        G_all, ell_all = self._shard.gather_rows(self._shard.split(idx)[0], n, [G, ell])
        if out is None:
            return G_all, ell_all
        if tuple(out.shape) != (n, self.dim) or out.dtype != self.dtype:
            raise ValueError(
                f"out must be a [{n}, {self.dim}] tensor of dtype {self.dtype}, got "
                f"{list(out.shape)} {out.dtype}"
            )
        return out.copy_(G_all), ell_all

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
            (total,) = torch.autograd.grad(self.batch_loss(th, x, y) * n, th)
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
                    raise_if_out_of_memory(exc)
                    if self._vmap_ok:
                        raise
                    self._vmap_failed(exc)
            n = _data.batch_size_of(x)
            if self._func_grad_ok:
                try:
                    one = grad_and_value(self._sample_loss)
                    rows = [one(theta, _row(x, i), _row(y, i)) for i in range(n)]
                except (RuntimeError, NotImplementedError) as exc:
                    raise_if_out_of_memory(exc)
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
        """Per-sample losses ``ℓ(x_i; θ)`` ``[n]``.

        Raises:
            ValueError: ``theta`` that is not ``[D]`` in the model's dtype and on its device.
        """
        self.check_decoupled("per_sample_losses")
        idx = self.check_indices(indices)
        theta = self.point(theta)
        with torch.no_grad():
            rows = self.plan_rows("forward")
            parts = [self.sample_losses(theta, x, y) for x, y, _ in self.chunks(idx, rows)]
        if self._shard is None:
            return torch.cat(parts)
        mine = torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype, device=self.device)
        positions = self._shard.split(idx)[0]
        return self._shard.gather_rows(positions, self._shard.count(idx), [mine])[0]

    def batched_loss(
        self, thetas: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``L(θ_j)`` for a batch of parameter vectors ``thetas`` ``[B, D]`` → ``[B]``.

        Vmapped over the parameter vectors; a loop over them for layers without a batching rule.
        """
        self.check_decoupled("batched_loss")
        if thetas.ndim != 2 or thetas.shape[1] != self.dim:
            raise ValueError(f"thetas must have shape [B, {self.dim}], got {list(thetas.shape)}")
        with torch.no_grad(), _math_attention():
            try:  # all vectors at once must fit one sample; else one vector at a time
                rows: int | None = self.plan_rows("batched", thetas.shape[0])
            except MemoryError:
                rows = None
            if self._batched_theta_ok is not False and rows is not None:
                many = vmap(self.batch_loss, in_dims=(0, None, None))
                try:
                    out = self.reduce_mean(lambda x, y: many(thetas, x, y), indices, rows=rows)
                    self._batched_theta_ok = True
                    return out
                except (RuntimeError, NotImplementedError) as exc:
                    raise_if_out_of_memory(exc)
                    if self._batched_theta_ok:
                        raise
                    self._batched_theta_ok = False
                    self.routes["batched_loss"] = (
                        f"a loop over parameter vectors: vmap failed ({_first_line(exc)})"
                    )
            return torch.stack(
                [
                    self.reduce_mean(
                        self._loss_at(th),
                        indices,
                        rows=self.plan_rows("forward"),
                    )
                    for th in thetas
                ]
            )

    def weighted_gradients(
        self, weights: torch.Tensor, theta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1/N) Σ_i W[j, i] ∇ℓ(x_i; θ)`` for each row j of ``W`` ``[m, N]``, plus the losses.

        The transposed Jacobian of the per-sample losses times ``W``ᵀ (the gradient of the
        re-weighted loss ``(1/N) Σ_i W[j, i] ℓ_i``): one forward pass per chunk and one
        vector-Jacobian product per weight row (vmapped), never the ``[N, D]`` matrix. ``W = 1``
        gives ``∇L``; rows ``1 + ε`` give ``∇L + (1/N) Σ_i ε_i g_i`` (multiplicative noise).

        Args:
            weights: ``[m, N]`` (or ``[N]``, treated as one row).
            theta: the flat parameters (default: the model's current θ).

        Returns:
            ``(grads [m, D], losses [N])`` (``grads`` is ``[D]`` when ``weights`` was ``[N]``).

        Raises:
            ValueError: ``weights`` is not ``[m, N]`` or ``[N]``, or ``theta`` is not ``[D]`` in
            the model's dtype and on its device. RuntimeError: coupled samples
            (:meth:`check_decoupled`) or a non-finite result.
        """
        self.check_decoupled("weighted_gradients")
        N = self.num_samples
        squeeze = weights.ndim == 1
        W = weights[None, :] if squeeze else weights
        if W.ndim != 2 or W.shape[1] != N:
            raise ValueError(
                f"weights must have shape [m, {N}] or [{N}], got {list(weights.shape)}"
            )
        W = W.to(device=self.device, dtype=self.dtype)
        theta = self.point(theta)
        total = torch.zeros(W.shape[0], self.dim, dtype=self.dtype, device=self.device)
        losses = []
        if self._shard is not None:  # this rank's columns of W
            W = W[:, self._shard.offset : self._shard.offset + self._shard.local]
        for x, y, pos in self.chunks(None, self.plan_rows("hvp", W.shape[0])):

            def f(th: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                return self.sample_losses(th, x, y)

            l, pullback = vjp(f, theta)[:2]
            Wc = W[:, pos]
            if Wc.shape[0] == 1:
                g = pullback(Wc[0])[0][None, :]
            else:
                g = vmap(lambda w, pb=pullback: pb(w)[0])(Wc)
            total = total + g
            losses.append(l.detach())
        if self._shard is not None:  # one collective: the sums and every rank's losses
            sh = self._shard
            buf = torch.zeros(total.numel() + N, dtype=self.dtype, device=self.device)
            buf[: total.numel()] = total.reshape(-1)
            buf[total.numel() + sh.offset : total.numel() + sh.offset + sh.local] = torch.cat(
                losses
            )
            sh.all_reduce(buf)
            total, losses = buf[: total.numel()].reshape(total.shape), [buf[total.numel() :]]
        total = total / N
        check_finite(total, "the weighted gradient")
        return (total[0] if squeeze else total), torch.cat(losses)
