"""A batched engine: M members — each a (dynamics, random stream) with its own θ — advanced together.

The per-dynamics loop (:func:`~sgdnoise.make_optimizer` + ``step()``) runs one model at a time;
on a GPU a small model then spends its time launching kernels. :class:`BatchedEngine` keeps the
members' flat parameters stacked as one ``[M, D]`` tensor and evaluates the model on all of them
at once with ``torch.func.functional_call`` under ``vmap`` — the flat-vector form of
``torch.func.stack_module_state``: :meth:`Problem.outputs` already calls the model functionally
on a flat θ, so stacking the flat vectors is the same stacking without a second parameter
layout, and a member's θ is bit for bit the vector its optimizer would hold.

Batched across members (one vmapped call per group of members, chunked over the data):

* full-batch ``(L, ∇L)`` (GD, and GLD between refreshes), mini-batch ``(L_B, ∇L_B)`` (SGD, each
  member gathering its own indices), per-sample gradients and losses (GLD refreshes), weighted
  gradients (``multiplicative``), test/train evaluation (:meth:`BatchedEngine.evaluate`).

Per member (the same code the optimizers run, so the numbers are the same):

* every random draw, from the member's own generator in the loop's order: SGD's indices, the
  ``z`` of a Gaussian structure (``NoiseModel.sample``), the multiplicative weights;
* the covariance refresh (``NoiseModel.refresh`` with the member's per-sample gradients, at the
  member's θ). The Lanczos of the ``hessian``/``hessian_top1`` members refreshing at the same step
  runs in lock-step (:func:`~sgdnoise.linalg.lockstep.run_lockstep`: each member's unchanged
  solver in a thread, its Hessian products batched with the other members' requests of the same
  width by :meth:`Problem.hvp_members`); ``leading``'s Lanczos on Σ_b runs member by member.

So a member's trajectory equals the same dynamics run alone up to the rounding of the batched
reductions (``tests/test_engine.py``: 1e-10 relative in float64 over 50 steps, every structure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from ._engine_plan import EnginePlan, Member, keeps_per_sample, plan_members, resolve_engine
from ._optim_params import check_lr
from ._utils import resolve_generator
from .linalg.covariance import batch_scale
from .linalg.lockstep import run_lockstep
from .noise import NoiseModel, noise_class, noise_model
from .noise.dynamics import dynamics_names
from .optim import sample_batch
from .problem import Problem

__all__ = ["BatchedEngine", "EnginePlan", "Member", "plan_members", "resolve_engine"]


class BatchedEngine:
    """Advance M members — (dynamics, seed), each with its own θ — one step at a time, together.

    Each member follows exactly the update of its optimizer (:class:`~sgdnoise.GD`,
    :class:`~sgdnoise.MinibatchSGD`, :class:`~sgdnoise.GLD`): ``θ ← θ − η (g + n)``, with the same
    random draws from its own generator in the same order and the covariance refreshed on the
    same steps (t ≡ 0 mod ``refresh_every``), so member m after t steps equals its optimizer after
    t steps up to the rounding of the batched reductions (see the module docstring).

    Args:
        problem: model, loss and data (shared; the engine sets its θ to a member's θ while that
            member's covariance is refreshed and leaves the last one there).
        members: the members.
        theta: initial parameters ``[M, D]`` (or ``[D]``, shared by every member).
        plan: a memory plan (default: :func:`plan_members`).
        lockstep_lanczos: run the Hessian members' Lanczos refreshes in lock-step with their
            products batched across members (default); ``False``: member by member. Both give
            each member's own solver decisions; only the rounding of the products differs.

    Raises:
        ValueError: an unknown dynamics, a bad step size, batch size or refresh period, options
            for GD/SGD, ``noise_only_on_refresh`` (not supported), ``theta`` of the wrong shape,
            or a problem sharded over torchrun ranks (the passes do not reduce over ranks).
        TypeError: an option the structure does not have.

    Attributes:
        theta: the members' parameters ``[M, D]``. num_steps: steps taken. plan: the
        :class:`EnginePlan`. noise: each GLD member's structure (``None`` before its first step).
        last_loss: ``[M]`` losses at the start of the last step (SGD: the mini-batch loss).
    """

    def __init__(
        self,
        problem: Problem,
        members: Sequence[Member],
        theta: torch.Tensor,
        *,
        plan: EnginePlan | None = None,
        lockstep_lanczos: bool = True,
    ) -> None:
        self.problem = problem
        self.members = list(members)
        if not self.members:
            raise ValueError("BatchedEngine needs at least one member, got none")
        if problem.shard is not None:
            raise ValueError(
                "the batched engine does not reduce over torchrun ranks (its passes see only this "
                "rank's shard); run sharded problems with make_optimizer (sgdnoise fashion "
                "--engine loop)"
            )
        for m in self.members:
            _check_member(m, problem)
        M, D = len(self.members), problem.dim
        theta = theta.detach().to(device=problem.device, dtype=problem.dtype)
        if theta.shape == (D,):
            theta = theta.expand(M, D)
        if theta.shape != (M, D):
            raise ValueError(
                f"theta must have shape [D] or [M, D] = [{M}, {D}], got {list(theta.shape)}"
            )
        self.theta = theta.clone()
        self.generators = [resolve_generator(m.seed, m.generator) for m in self.members]
        self.noise: list[NoiseModel | None] = [None] * M
        self.num_steps = 0
        self.plan = plan if plan is not None else plan_members(problem, self.members)
        self.last_loss = torch.full((M,), float("nan"), dtype=problem.dtype, device=problem.device)
        self._force_refresh = [False] * M
        self._pending_warm: list[dict[str, torch.Tensor] | None] = [None] * M
        #: run the Lanczos refreshes of the Hessian members in lock-step, products batched
        #: across members (else member by member, as alone).
        self.lockstep_lanczos = lockstep_lanczos
        self._lr = torch.tensor([m.lr for m in self.members], dtype=problem.dtype,
                                device=problem.device)  # fmt: skip

    # ------------------------------------------------------------------ batched passes
    def _loss(self, th: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
        return self.problem.batch_loss(th, x, y)

    def _groups(self, idx: Sequence[int]) -> list[list[int]]:
        g = self.plan.group
        return [list(idx[i : i + g]) for i in range(0, len(idx), g)]

    def full_gradients(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L [m], ∇L [m, D])`` at the θ of members ``idx``, over all samples (batched).

        Chunks of the data are weighted by their size, as :meth:`Problem.reduce_mean`.

        Args:
            idx: member indices.

        Returns:
            The losses and the full-batch gradients, in the order of ``idx``.
        """
        p, n = self.problem, self.problem.num_samples
        fn = vmap(grad_and_value(self._loss), in_dims=(0, None, None))
        losses, grads = [], []
        for group in self._groups(idx):
            th = self.theta[group]
            g_tot: torch.Tensor | None = None
            l_tot: torch.Tensor | None = None
            for x, y, pos in p.chunks(None, self.plan.rows):
                g, loss = fn(th, x, y)
                w = (pos.stop - pos.start) / n
                g_tot = g * w if g_tot is None else g_tot + g * w
                l_tot = loss * w if l_tot is None else l_tot + loss * w
            assert g_tot is not None and l_tot is not None
            grads.append(g_tot)
            losses.append(l_tot)
        return torch.cat(losses), torch.cat(grads)

    def batch_gradients(
        self, idx: Sequence[int], indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_B [m], ∇L_B [m, D])``: member ``idx[j]``'s mean over its own samples ``indices[j]``.

        Args:
            idx: member indices. indices: ``[m, b]`` sample indices, one row per member.

        Returns:
            The mini-batch losses and gradients.
        """
        fn = vmap(grad_and_value(self._loss), in_dims=(0, 0, 0))
        losses, grads = [], []
        for j0, group in zip(range(0, len(idx), self.plan.group), self._groups(idx), strict=True):
            rows = indices[j0 : j0 + len(group)]
            x, y = self.problem.take(rows.reshape(-1))
            x = x.reshape(len(group), rows.shape[1], *x.shape[1:])
            y = y.reshape(len(group), rows.shape[1], *y.shape[1:])
            g, loss = fn(self.theta[group], x, y)
            grads.append(g)
            losses.append(loss)
        return torch.cat(losses), torch.cat(grads)

    def per_sample_gradients(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G [m, N, D], ℓ [m, N])``: per-sample gradients and losses of members ``idx`` (batched).

        Args:
            idx: member indices.

        Returns:
            A fresh ``[m, N, D]`` tensor (row j is member ``idx[j]``'s, contiguous) and the losses.
        """
        p = self.problem

        def one(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Any:
            return grad_and_value(self._loss)(th, x.unsqueeze(0), y.unsqueeze(0))

        fn = vmap(vmap(one, in_dims=(None, 0, 0)), in_dims=(0, None, None))
        G = torch.empty(len(idx), p.num_samples, p.dim, dtype=p.dtype, device=p.device)
        ell = torch.empty(len(idx), p.num_samples, dtype=p.dtype, device=p.device)
        j0 = 0
        for group in self._groups(idx):
            sl = slice(j0, j0 + len(group))
            for x, y, pos in p.chunks(None, self.plan.per_sample_rows):
                G[sl, pos], ell[sl, pos] = fn(self.theta[group], x, y)
            j0 += len(group)
        return G, ell

    def weighted_gradients(
        self, idx: Sequence[int], weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``((1/N) Σ_i w_ji ℓ_i [m], (1/N) Σ_i w_ji ∇ℓ_i [m, D])`` for weights ``[m, N]`` (batched).

        Args:
            idx: member indices. weights: one row per member.

        Returns:
            The mean (unweighted) losses ``L`` and the weighted gradients.
        """
        p, n = self.problem, self.problem.num_samples

        def wloss(th: torch.Tensor, x: Any, y: Any, w: torch.Tensor) -> tuple[torch.Tensor, Any]:
            ell = p.sample_losses(th, x, y)
            return (w * ell).sum() / n, ell.sum() / n

        fn = vmap(torch.func.grad(wloss, has_aux=True), in_dims=(0, None, None, 0))
        losses, grads = [], []
        for j0, group in zip(range(0, len(idx), self.plan.group), self._groups(idx), strict=True):
            w = weights[j0 : j0 + len(group)]
            g_tot: torch.Tensor | None = None
            l_tot: torch.Tensor | None = None
            for x, y, pos in p.chunks(None, self.plan.rows):
                g, loss = fn(self.theta[group], x, y, w[:, pos])
                g_tot = g if g_tot is None else g_tot + g
                l_tot = loss if l_tot is None else l_tot + loss
            assert g_tot is not None and l_tot is not None
            grads.append(g_tot)
            losses.append(l_tot)
        return torch.cat(losses), torch.cat(grads)

    @torch.no_grad()
    def losses(self, thetas: torch.Tensor) -> torch.Tensor:
        """Full-batch mean losses ``[K]`` at any K parameter vectors ``thetas`` ``[K, D]``.

        Forward passes only (vmapped over the rows, chunked over the data and weighted by chunk
        size as :meth:`Problem.reduce_mean`), ``plan.group`` rows at a time: e.g. the members'
        θ, or perturbed copies of them for the expected sharpness.

        Raises:
            ValueError: ``thetas`` is not ``[K, D]``.
        """
        p, n = self.problem, self.problem.num_samples
        if thetas.ndim != 2 or thetas.shape[1] != p.dim:
            raise ValueError(f"thetas must have shape [K, {p.dim}], got {list(thetas.shape)}")
        fn = vmap(self._loss, in_dims=(0, None, None))
        out = []
        for s in range(0, thetas.shape[0], self.plan.group):
            th = thetas[s : s + self.plan.group]
            total: torch.Tensor | None = None
            for x, y, pos in p.chunks(None, self.plan.rows):
                part = fn(th, x, y) * ((pos.stop - pos.start) / n)
                total = part if total is None else total + part
            assert total is not None
            out.append(total)
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, *, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member, per-sample ``(correct [M, n] bool, cross-entropy [M, n])`` of a classifier.

        Args:
            x, y: inputs and class labels (on the problem's device).
            chunk: samples per chunk (default: the plan's rows).

        Returns:
            Whether each member's arg-max class is right, and its cross-entropy loss.
        """
        fn = vmap(self.problem.outputs, in_dims=(0, None))
        step = chunk or max(1, self.plan.rows)
        correct, losses = [], []
        for group in self._groups(range(len(self.members))):
            ok_g, loss_g = [], []
            for s in range(0, x.shape[0], step):
                out = fn(self.theta[group], x[s : s + step])
                yy = y[s : s + step]
                ok_g.append(out.argmax(-1) == yy)
                ce = torch.nn.functional.cross_entropy(
                    out.flatten(0, 1), yy.repeat(len(group)), reduction="none"
                )
                loss_g.append(ce.reshape(len(group), -1))
            correct.append(torch.cat(ok_g, 1))
            losses.append(torch.cat(loss_g, 1))
        return torch.cat(correct), torch.cat(losses)

    # ------------------------------------------------------------------ the step
    def _needs_refresh(self, j: int) -> bool:
        m = self.members[j]
        return (
            self.noise[j] is None or self._force_refresh[j] or self.num_steps % m.refresh_every == 0
        )

    def _refresh(self, j: int, per_sample: torch.Tensor | None) -> NoiseModel:
        """Rebuild member j's covariance at its θ (as ``GLD._refresh``)."""
        m, p = self.members[j], self.problem
        p.set_theta(self.theta[j])
        warm = self._pending_warm[j]  # kept until the refresh is done: state_dict saves it
        model = self.noise[j]
        if model is None:
            assert m.structure is not None
            model = noise_model(m.structure, p, m.batch_size, replacement=m.replacement,
                                per_sample=per_sample, warm_state=warm, **m.options)  # fmt: skip
            self.noise[j] = model
        else:
            if warm:
                model.set_warm_state(warm)
            model.refresh(p, per_sample=per_sample, overwrite_per_sample=per_sample is not None)
        self._pending_warm[j], self._force_refresh[j] = None, False
        return model

    def _classify(self) -> dict[str, list[int]]:
        """Members by the pass they need at this step."""
        kinds: dict[str, list[int]] = {"full": [], "sgd": [], "per_sample": [], "weighted": []}
        for j, m in enumerate(self.members):
            s = m.structure
            if m.dynamics == "sgd":
                kinds["sgd"].append(j)
            elif s is not None and noise_class(s).forms_gradient:
                kinds["weighted"].append(j)
            elif self._needs_refresh(j) and keeps_per_sample(m, self.problem):
                kinds["per_sample"].append(j)
            else:
                kinds["full"].append(j)
        return kinds

    def step(self) -> torch.Tensor:
        """Advance every member by one step.

        A step stopped by an exception (Ctrl-C included) is undone where it matters: generator
        states, the members' noise models before their first refresh and the warm starts of the
        refreshes due at this step are restored (references, no copies) and those refreshes stay
        due, so :meth:`state_dict` — or a retried step — continues exactly as the uninterrupted
        run.

        Returns:
            ``[M]`` losses at the start of the step (the mini-batch loss for SGD members).
        """
        generators = [g.get_state() for g in self.generators]
        due = [
            j
            for j, m in enumerate(self.members)
            if m.structure is not None and self._needs_refresh(j)
        ]
        before = {j: (self.noise[j], self._warm_start(j, copy=False)) for j in due}
        try:
            return self._step()
        except BaseException:
            for g, state in zip(self.generators, generators, strict=True):
                g.set_state(state)
            for j, (model, warm) in before.items():
                if model is None:  # set up (lock-step) or built during the step: not yet refreshed
                    self.noise[j] = None
                self._pending_warm[j], self._force_refresh[j] = warm, True
            raise

    def _warm_start(self, j: int, *, copy: bool = True) -> dict[str, torch.Tensor] | None:
        """What member j's next refresh starts from (``None``: nothing); see
        :meth:`NoiseModel.warm_state` for ``copy``."""
        if self._pending_warm[j] is not None:
            return self._pending_warm[j]
        model = self.noise[j]
        return (model.warm_state(copy=copy) or None) if model is not None else None

    def _step(self) -> torch.Tensor:
        M, p = len(self.members), self.problem
        grad = torch.empty(M, p.dim, dtype=p.dtype, device=p.device)
        loss = torch.empty(M, dtype=p.dtype, device=p.device)
        kinds = self._classify()
        if kinds["sgd"]:
            idx = torch.stack([
                sample_batch(p.num_samples, self.members[j].batch_size,
                             generator=self.generators[j],
                             replacement=self.members[j].replacement).to(p.device)
                for j in kinds["sgd"]
            ])  # fmt: skip
            loss[kinds["sgd"]], grad[kinds["sgd"]] = self.batch_gradients(kinds["sgd"], idx)
        if kinds["full"]:
            loss[kinds["full"]], grad[kinds["full"]] = self.full_gradients(kinds["full"])
        if self.lockstep_lanczos:
            self._lockstep_pairs(
                kinds["per_sample"] + [j for j in kinds["full"] if self._needs_refresh(j)]
            )
        if kinds["per_sample"]:
            G, ell = self.per_sample_gradients(kinds["per_sample"])
            for r, j in enumerate(kinds["per_sample"]):
                loss[j], grad[j] = ell[r].mean(), G[r].mean(0)
                self._refresh(j, G[r])
        if kinds["weighted"]:
            self._weighted_step(kinds["weighted"], loss, grad)
        noise = torch.zeros_like(grad)
        for j in kinds["full"] + kinds["per_sample"]:
            if self.members[j].structure is None:
                continue
            if j in kinds["full"] and self._needs_refresh(j):
                self._refresh(j, None)
            model = self.noise[j]
            assert model is not None
            noise[j] = model.sample(1, generator=self.generators[j])[0]
        self.theta = self.theta - self._lr[:, None] * (grad + noise)
        self.num_steps += 1
        self.last_loss = loss
        return loss

    def _lockstep_pairs(self, refreshing: Sequence[int]) -> None:
        """The Lanczos of every refreshing Hessian member (``hessian``, ``hessian_top1``) in
        lock-step, their products batched across members
        (:func:`~sgdnoise.linalg.lockstep.run_lockstep`, :meth:`Problem.hvp_members`); each
        member's refresh then uses its pairs."""
        p = self.problem
        js = [
            j
            for j in refreshing
            if self.members[j].structure is not None
            and hasattr(noise_class(str(self.members[j].structure)), "find_pairs")
        ]
        if len(js) < 2:
            return
        models: list[Any] = []
        for j in js:
            model, m = self.noise[j], self.members[j]
            warm, self._pending_warm[j] = self._pending_warm[j], None
            if model is None:  # a first refresh (or the first after a restart): set up, unrefreshed
                model = noise_class(str(m.structure)).unrefreshed(
                    p, m.batch_size, replacement=m.replacement, warm_state=warm, **m.options
                )
                self.noise[j] = model
            elif warm:
                model.set_warm_state(warm)
            models.append(model)

        def products(batch: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
            out: list[torch.Tensor | None] = [None] * len(batch)
            by_width: dict[int, list[int]] = {}
            for pos, (_, V) in enumerate(batch):
                by_width.setdefault(V.shape[1], []).append(pos)
            for poss in by_width.values():
                for group in self._groups(poss):
                    th = self.theta[[js[batch[pos][0]] for pos in group]]
                    res = p.hvp_members(th, torch.stack([batch[pos][1] for pos in group]))
                    for r, pos in enumerate(group):
                        out[pos] = res[r]
            return [o for o in out if o is not None]

        pairs = run_lockstep([m.find_pairs for m in models], products, dim=p.dim,
                             dtype=p.dtype, device=p.device)  # fmt: skip
        for model, found in zip(models, pairs, strict=True):
            model.use_pairs(found)

    def _weighted_step(self, idx: list[int], loss: torch.Tensor, grad: torch.Tensor) -> None:
        """Multiplicative members: fresh weights from each stream, one batched weighted pass."""
        rows = []
        for j in idx:
            model: Any = self.noise[j]
            if model is None:
                model = self._refresh(j, None)
            # the structures that form ∇L + n draw per-example weights (sample_weights)
            rows.append(model.sample_weights(1, generator=self.generators[j])[0])
        loss[idx], grad[idx] = self.weighted_gradients(idx, torch.stack(rows))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """θ, the step counter, each member's generator state and eigen-solver warm start.

        Returns:
            A dict for ``torch.save``; :meth:`load_state_dict` continues from it (the next step
            refreshes every GLD member's covariance, as :class:`~sgdnoise.GLD` after a restart).
        """
        return {
            "theta": self.theta.cpu(),
            "num_steps": self.num_steps,
            "generator_states": [g.get_state() for g in self.generators],
            "warm_states": [  # a warm start not yet used by a refresh is kept as it came
                {k: v.cpu() for k, v in (self._warm_start(j) or {}).items()}
                for j in range(len(self.members))
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (same members, in the same order).

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: the state has another number of members or another D.
        """
        theta = state["theta"]
        if tuple(theta.shape) != tuple(self.theta.shape):
            raise ValueError(
                f"the state holds θ of shape {list(theta.shape)}, this engine "
                f"{list(self.theta.shape)}; build the engine with the same members"
            )
        self.theta = theta.to(device=self.problem.device, dtype=self.problem.dtype).clone()
        self.num_steps = int(state["num_steps"])
        for g, s in zip(self.generators, state["generator_states"], strict=True):
            g.set_state(s)
        self._pending_warm = [dict(w) or None for w in state["warm_states"]]
        self._force_refresh = [m.structure is not None for m in self.members]


def _check_member(m: Member, problem: Problem) -> None:
    names = dynamics_names()
    if m.dynamics not in names:
        raise ValueError(f"unknown dynamics {m.dynamics!r}; valid names: {', '.join(names)}")
    check_lr(m.lr)
    if m.dynamics in ("gd", "sgd") and m.options:
        raise ValueError(f"{m.dynamics!r} takes no noise options, got {sorted(m.options)}")
    if "noise_only_on_refresh" in m.options:
        raise ValueError(
            "the batched engine does not reproduce noise_only_on_refresh (the released code's "
            "quirk); run that member with make_optimizer"
        )
    if (
        isinstance(m.refresh_every, bool)
        or not isinstance(m.refresh_every, int)
        or m.refresh_every < 1
    ):
        raise ValueError(f"refresh_every must be a positive int, got {m.refresh_every!r}")
    N = problem.num_samples
    if m.dynamics == "sgd" and not 1 <= m.batch_size <= N:
        raise ValueError(
            f"batch_size must be an integer in [1, N] = [1, {N}], got {m.batch_size!r}"
        )
    if m.structure is not None:
        batch_scale(N, m.batch_size, m.replacement)
        noise_class(m.structure).resolve_options(m.options)
