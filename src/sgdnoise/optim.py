"""Noise-injected dynamics — GD, mini-batch SGD and GLD — sharing one code path.

All three are ``torch.optim.Optimizer`` s over the trainable parameters of a
:class:`~sgdnoise.Problem` that compute their own gradients from the problem (``step()`` takes no
closure and ignores ``p.grad``) and apply the one functional update :func:`gld_step`:

* :class:`GD`: ``θ ← θ − η ∇L(θ)`` (full batch);
* :class:`MinibatchSGD`: ``θ ← θ − η ∇L_B(θ)`` with a fresh mini-batch B of size b per step
  (i.i.d. indices with replacement, or a uniform subset without); gradient noise covariance Σ_b;
* :class:`GLD`: ``θ ← θ − η (∇L(θ) + n_t)`` with ``n_t`` a fresh draw, *at every step*, from a
  registered noise structure (:func:`~sgdnoise.noise_model`) whose covariance is refreshed every
  ``refresh_every`` steps (so the parameter-level covariance of a step is ``η² Cov(n_t)``).

On a refresh step of a structure that needs per-sample gradients, GLD computes them once
(:func:`~sgdnoise.noise.per_sample_gradients_and_losses`) and uses ``G.mean(0)`` as ``∇L`` — no
second full-batch pass. :func:`make_optimizer` builds any of them from a dynamics name (``"gd"``,
``"sgd"``, ``"gld_<structure>"``) and :func:`run_dynamics` runs any of them with the same loop.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._optim_params import check_lr, is_int, materializes, split_parameters
from ._utils import as_generator, resolve_generator
from .linalg.covariance import batch_scale
from .noise import NoiseModel, noise_class, noise_model, per_sample_gradients_and_losses
from .noise.dynamics import default_refresh, dynamics_family, dynamics_label, dynamics_names
from .problem import Problem

__all__ = [
    "GD",
    "GLD",
    "MinibatchSGD",
    "ProblemOptimizer",
    "StepInfo",
    "default_refresh",
    "dynamics_family",
    "dynamics_label",
    "dynamics_names",
    "factor_noise",
    "gld_step",
    "make_optimizer",
    "run_dynamics",
    "sample_batch",
]


# --------------------------------------------------------------------------------------------
# Functional forms (broadcast over leading dimensions: vectorised runs)
# --------------------------------------------------------------------------------------------


def gld_step(
    theta: torch.Tensor, grad: torch.Tensor, lr: float, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """One step ``θ − η (g + n)`` (a new tensor; inputs are not modified).

    Shapes broadcast, so ``theta`` ``[R, D]`` advances R independent runs at once. ``noise=None``
    is GD (or SGD when ``grad`` is a mini-batch gradient). ``n`` is gradient-level: the parameter
    perturbation is ``−η n`` with covariance ``η² Cov(n)``.

    Args:
        theta: parameters ``[..., D]``. grad: the gradient g, broadcastable to ``theta``.
        lr: step size η. noise: gradient-level noise n (``None``: none).

    Returns:
        ``θ − η (g + n)``, the broadcast shape of the inputs.

    Raises:
        RuntimeError: shapes that do not broadcast (torch's error).

    Source: Zhu et al. (ICML 2019), Eq. 2 (GD with unbiased noise).
    """
    step = grad if noise is None else grad + noise
    return theta - lr * step


def factor_noise(factor: torch.Tensor, *, generator: torch.Generator | int) -> torch.Tensor:
    """Gaussian draws ``n = L z``, ``z ~ N(0, I_r)``, for a batch of factors ``L`` ``[..., D, r]``.

    One independent draw per leading index (e.g. per run); ``Cov(n) = L Lᵀ``. ``z`` is drawn on the
    generator's device as ``[..., r]`` and moved to ``factor``'s device.
    """
    gen = as_generator(generator)
    z = torch.randn(factor.shape[:-2] + factor.shape[-1:], generator=gen, dtype=factor.dtype,
                    device=gen.device).to(factor.device)  # fmt: skip
    return (factor @ z.unsqueeze(-1)).squeeze(-1)


def sample_batch(
    num_samples: int, batch_size: int, *, generator: torch.Generator, replacement: bool = True
) -> torch.Tensor:
    """Mini-batch indices ``[b]``: i.i.d. uniform (with replacement) or a uniform size-b subset."""
    if replacement:
        return torch.randint(0, num_samples, (batch_size,), generator=generator,
                             device=generator.device)  # fmt: skip
    return torch.randperm(num_samples, generator=generator, device=generator.device)[:batch_size]


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What one step saw.

    Attributes:
        step: index t of the step (θ_t → θ_{t+1}), starting at 0.
        loss: the loss at θ_t — full batch for GD/GLD, the mini-batch loss for SGD
            (``full_batch`` says which).
        grad_norm: ‖∇L(θ_t)‖ (GD, GLD except multiplicative), ‖∇L_B‖ (SGD), or the norm of the
            weighted-loss gradient ‖∇L + n‖ (GLD multiplicative).
        noise_norm: ‖n_t‖ (GLD with a Gaussian structure; 0.0 when no noise was injected), else None.
        refreshed: whether the noise covariance was rebuilt at this step.
        full_batch: whether ``loss`` is the full-batch loss.
    """

    step: int
    loss: float
    grad_norm: float
    noise_norm: float | None
    refreshed: bool
    full_batch: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


class ProblemOptimizer(torch.optim.Optimizer, metaclass=ABCMeta):
    """Base of :class:`GD`, :class:`MinibatchSGD` and :class:`GLD`.

    ``params`` is an iterable of the model's parameters, e.g. ``problem.model.parameters()``:
    frozen ones (``requires_grad=False``) are filtered out — they are constants of the problem and
    stay bit-for-bit unchanged — and the remaining set must be exactly the problem's trainable
    parameters (one parameter group; otherwise a ``ValueError`` names the extra or missing
    parameters). The optimizer reads θ with ``problem.theta()`` and writes it back with
    ``problem.set_theta``. ``step()`` returns the loss at θ_t (a 0-dim tensor) and stores a
    :class:`StepInfo` in ``last``. The learning rate lives in ``param_groups[0]["lr"]``, so torch
    LR schedulers work.

    Attributes:
        trained_parameter_names: names (as in ``model.named_parameters()``) of the parameters the
            optimizer trains, in θ's order (= ``problem.param_names``).
        frozen_parameter_names: names of the frozen parameters that were passed and skipped.
        problem, num_steps, last: the problem, the steps taken, the last :class:`StepInfo`.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, *, problem: Problem) -> None:
        trained, self.frozen_parameter_names = split_parameters(
            type(self).__name__, params, problem
        )
        super().__init__(trained, {"lr": check_lr(lr)})
        self.trained_parameter_names: list[str] = list(problem.param_names)
        self.problem = problem
        self.num_steps = 0
        self.last: StepInfo | None = None

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one step; returns the loss at θ before the step (see :class:`StepInfo`)."""
        if closure is not None:
            raise TypeError(
                f"{type(self).__name__}.step() computes the gradient from its Problem and takes no "
                "closure; call step() without arguments (p.grad is not used)"
            )
        loss, info = self._step(self.num_steps)
        self.num_steps += 1
        self.last = info
        return loss

    @abstractmethod
    def _step(self, t: int) -> tuple[torch.Tensor, StepInfo]:
        """Take step t in place; return the loss at the step's start and its :class:`StepInfo`."""

    def _extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps}

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"sgdnoise"``: the step counter and generator state."""
        state = super().state_dict()
        state["sgdnoise"] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("sgdnoise", {})
        super().load_state_dict(state_dict)
        self.num_steps = int(extra.get("num_steps", 0))
        gen = getattr(self, "generator", None)
        if gen is not None and "generator_state" in extra:
            gen.set_state(extra["generator_state"])

    def _apply(self, theta: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor | None) -> None:
        self.problem.set_theta(gld_step(theta, grad, self.lr, noise))


class GD(ProblemOptimizer):
    """Full-batch gradient descent ``θ ← θ − η ∇L(θ)`` over the problem's data (the poster's GD).

    Args:
        params: exactly the problem's trainable parameters (frozen ones are skipped).
        lr: step size η.
        problem: the :class:`~sgdnoise.Problem` whose full-batch gradient is used.
    """

    def _step(self, t: int) -> tuple[torch.Tensor, StepInfo]:
        theta = self.problem.theta()
        loss, grad = self.problem.loss_and_gradient(theta)
        self._apply(theta, grad, None)
        info = StepInfo(t, float(loss), float(grad.norm()), None, False, True)
        return loss, info


class MinibatchSGD(ProblemOptimizer):
    """Mini-batch SGD ``θ ← θ − η (1/b) Σ_{i∈B_t} ∇ℓ_i(θ)`` with a fresh batch per step.

    With ``replacement=True`` the b indices are i.i.d. uniform; otherwise B_t is a uniform subset
    of size b (independently per step). The gradient noise then has covariance exactly Σ_b as
    defined by :func:`~sgdnoise.batch_scale` with the same ``replacement`` flag, which is what the
    GLD structures imitate.

    Args:
        params, lr, problem: see :class:`ProblemOptimizer`.
        batch_size: b in ``[1, N]``.
        seed, generator: source of the batch indices (the generator wins, else a fresh one
            seeded with ``seed``, default 0).
        replacement: see above.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        *,
        problem: Problem,
        batch_size: int,
        seed: int | None = 0,
        generator: torch.Generator | int | None = None,
        replacement: bool = True,
    ) -> None:
        super().__init__(params, lr, problem=problem)
        N = problem.num_samples
        if not is_int(batch_size) or not 1 <= batch_size <= N:
            raise ValueError(
                f"batch_size must be an integer in [1, N] = [1, {N}], got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.replacement = bool(replacement)
        self.generator = resolve_generator(seed, generator)

    def _extra_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "generator_state": self.generator.get_state()}

    def _step(self, t: int) -> tuple[torch.Tensor, StepInfo]:
        p = self.problem
        idx = sample_batch(p.num_samples, self.batch_size, generator=self.generator,
                           replacement=self.replacement).to(p.device)  # fmt: skip
        theta = p.theta()
        loss, grad = p.loss_and_gradient(theta, idx)
        self._apply(theta, grad, None)
        return loss, StepInfo(t, float(loss), float(grad.norm()), None, False, False)


class GLD(ProblemOptimizer):
    """Gradient Langevin dynamics with structured noise: ``θ ← θ − η (∇L(θ) + n_t)``.

    ``n_t`` is a fresh draw at every step from the noise structure ``noise`` (a name from
    :func:`~sgdnoise.noise_structures` or a built :class:`~sgdnoise.noise.NoiseModel`), whose
    covariance is rebuilt at θ_t on steps t = 0, r, 2r, … (``r = refresh_every``; eigen solvers
    warm-start from the previous refresh). Between refreshes the cached covariance is sampled.

    * Structures that need per-sample gradients compute them once on refresh steps and use their
      mean as ``∇L`` (no second pass); other steps do one ``loss_and_gradient`` pass. The
      ``[N, D]`` per-sample matrix is one buffer for the whole run, centred in place by the
      structure, so ``opt.noise.covariance`` is valid until the next refresh (copy what you keep).
    * Memory follows :func:`~sgdnoise.gradient_noise_covariance`: the ``[N, D]`` buffer exists
      only when ``N·D ≤ sgdnoise.linalg.covariance.MATERIALIZE_LIMIT`` (2²⁷ numbers; a module
      attribute read at every refresh, so it can be lowered). Above it ``∇L`` comes from
      ``loss_and_gradient`` and the structure streams Σ_b (its trace, diagonal, products — and for
      ``full`` one weighted-gradient pass per draw); ``_per_sample_buffer`` stays ``None``.
    * ``state_dict()`` holds the step counter, the generator state and the eigen solvers' warm
      start (:meth:`~sgdnoise.noise.NoiseModel.warm_state`); a run resumed on a refresh step
      continues exactly.
    * Structures whose noise enters through the loss (``forms_gradient``, e.g. ``multiplicative``)
      form ``∇L + n`` themselves at every step (:meth:`~sgdnoise.noise.NoiseModel.noisy_gradient`,
      at the current θ; ``refresh_every`` is irrelevant) and report no ``noise_norm``.
    * ``noise_only_on_refresh=True`` reproduces the released ``gld_lead.py`` quirk (noise injected
      only on refresh steps, ``n_t = 0`` otherwise). Off by default: it divides the injected noise
      energy by ``refresh_every``, which is not the dynamics the paper describes.

    Args:
        params: the model's parameters (``problem.model.parameters()``; frozen ones are skipped).
        lr: step size η (gradient-level noise; parameter covariance η² Cov(n)).
        noise: structure name or a NoiseModel built on ``problem``.
        problem: model, loss and data.
        batch_size: b, the mini-batch size whose SGD noise Σ_b the structure imitates.
        refresh_every: covariance refresh period in steps (≥ 1).
        seed, generator: source of the noise (the generator wins, else a fresh one seeded with
            ``seed``, default 0).
        replacement: Σ_b for mini-batches with (default) or without replacement.
        noise_only_on_refresh: the released code's GLD-leading quirk (see above).
        **options: options of the structure (e.g. ``k=20``, ``sigma=1e-3``).

    Example:
        >>> import torch
        >>> import sgdnoise
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.randn(16, 4, generator=g, dtype=torch.float64)  # 3 inputs, 1 target
        >>> model = torch.nn.Linear(3, 1).double()
        >>> mse = torch.nn.functional.mse_loss
        >>> problem = sgdnoise.Problem(model, mse, data[:, :3], data[:, 3:])
        >>> opt = sgdnoise.GLD(model.parameters(), 0.1, noise="diag", problem=problem,
        ...                    batch_size=4, generator=g)
        >>> loss = opt.step()
        >>> opt.last.refreshed
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        *,
        noise: str | NoiseModel,
        problem: Problem,
        batch_size: int = 1,
        refresh_every: int = 1,
        seed: int | None = 0,
        generator: torch.Generator | int | None = None,
        replacement: bool = True,
        noise_only_on_refresh: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(params, lr, problem=problem)
        if not is_int(refresh_every) or refresh_every < 1:
            raise ValueError(
                f"refresh_every must be a positive int (steps between covariance refreshes), "
                f"got {refresh_every!r}"
            )
        if not isinstance(noise_only_on_refresh, bool):
            raise ValueError(
                f"noise_only_on_refresh must be True or False, got {noise_only_on_refresh!r}"
            )
        self.generator = resolve_generator(seed, generator)
        self.refresh_every = refresh_every
        self.noise_only_on_refresh = noise_only_on_refresh
        self._force_refresh = False
        self._prebuilt_fresh = False
        if isinstance(noise, NoiseModel):
            if options:
                raise TypeError(
                    "options were given together with a built NoiseModel; pass a structure name "
                    f"with options, or build the model with them (got {sorted(options)})"
                )
            if noise.problem.dim != problem.dim:
                raise ValueError(
                    f"the noise model has D = {noise.problem.dim}, the problem D = {problem.dim}"
                )
            self.noise: NoiseModel | None = noise
            self.noise_name = noise.name
            self._prebuilt_fresh = True  # built at the current θ: step 0 needs no refresh
        elif isinstance(noise, str):
            cls = noise_class(noise)  # ValueError listing the valid names
            batch_scale(problem.num_samples, batch_size, replacement)  # validate now, not at step 0
            cls.resolve_options(options)
            self.noise = None  # built on the first step (with that step's per-sample gradients)
            self.noise_name = noise
        else:
            raise TypeError(
                f"noise must be a structure name or a NoiseModel, got {type(noise).__name__}"
            )
        self._spec = {"batch_size": batch_size, "replacement": bool(replacement), **options}
        self._per_sample_buffer: torch.Tensor | None = None
        self._pending_warm_state: dict[str, torch.Tensor] | None = None

    def _extra_state(self) -> dict[str, Any]:
        warm = self._pending_warm_state  # loaded but not yet used by a refresh: kept as it came
        if warm is None:
            warm = self.noise.warm_state() if self.noise is not None else {}
        return {
            "num_steps": self.num_steps,
            "generator_state": self.generator.get_state(),
            # Eigen solvers warm-start from the last refresh: saved so that a resumed run's first
            # refresh starts where the uninterrupted run's would.
            "noise_warm_state": {k: v.cpu() for k, v in warm.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        warm = dict(state_dict.get("sgdnoise", {}).get("noise_warm_state") or {})
        super().load_state_dict(state_dict)
        self._force_refresh = True  # the cached covariance is not part of the state
        self._prebuilt_fresh = False
        self._pending_warm_state = warm or None

    def _refresh(self, per_sample: torch.Tensor | None, *, overwrite: bool = False) -> NoiseModel:
        warm = self._pending_warm_state
        if warm is None and self.noise is not None:
            warm = self.noise.warm_state(copy=False) or None
        try:
            if self.noise is None:
                self.noise = noise_model(
                    self.noise_name, self.problem, per_sample=per_sample, warm_state=warm,
                    **self._spec,
                )  # fmt: skip
            else:
                if warm:
                    self.noise.set_warm_state(warm)
                self.noise.refresh(
                    self.problem, per_sample=per_sample, overwrite_per_sample=overwrite
                )
        except BaseException:  # Ctrl-C included: the retried step refreshes again, from the same
            self._pending_warm_state, self._force_refresh = warm, True  # warm start
            raise
        self._pending_warm_state, self._force_refresh = None, False
        return self.noise

    def _step(self, t: int) -> tuple[torch.Tensor, StepInfo]:
        p = self.problem
        theta = p.theta()
        if noise_class(self.noise_name).forms_gradient:
            former = self.noise if self.noise is not None else self._refresh(None)
            loss, g_noisy = former.noisy_gradient(theta, generator=self.generator)
            p.set_theta(gld_step(theta, g_noisy, self.lr))
            return loss, StepInfo(t, float(loss), float(g_noisy.norm()), None, False, True)

        refresh = self.noise is None or self._force_refresh or t % self.refresh_every == 0
        if self._prebuilt_fresh:
            refresh = self._prebuilt_fresh = self._force_refresh = False
        model: NoiseModel | None
        if refresh and noise_class(self.noise_name).needs_per_sample and materializes(p):
            # One [N, D] buffer for the whole run: the structure centres it in place and keeps
            # it until the next refresh overwrites it (a fresh matrix per step costs page faults).
            first = self.noise is None
            buf = self._per_sample_buffer
            if buf is None or buf.shape != (p.num_samples, p.dim) or buf.dtype != p.dtype:
                buf = torch.empty(p.num_samples, p.dim, dtype=p.dtype, device=p.device)
            G, losses = per_sample_gradients_and_losses(p, theta, out=buf)
            loss, grad = losses.mean(), G.mean(0)  # the full gradient from the same pass
            model = self._refresh(G, overwrite=not first)
            self._per_sample_buffer = buf
        else:
            if refresh:
                # No [N, D] buffer above the limit (even if it was lowered mid-run): the structure
                # streams Σ_b itself (the rule of gradient_noise_covariance), and the refresh
                # below replaces its covariance, dropping the last reference to an old buffer.
                self._per_sample_buffer = None
            loss, grad = p.loss_and_gradient(theta)
            model = self._refresh(None) if refresh else self.noise
        assert model is not None
        n: torch.Tensor | None = None
        noise_norm = 0.0
        if refresh or not self.noise_only_on_refresh:
            draw = model.sample(1, generator=self.generator)[0]
            n, noise_norm = draw, float(draw.norm())
        self._apply(theta, grad, n)
        return loss, StepInfo(t, float(loss), float(grad.norm()), noise_norm, refresh, True)


def make_optimizer(
    dynamics: str,
    problem: Problem,
    lr: float,
    *,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    batch_size: int = 1,
    replacement: bool = True,
    refresh_every: int = 1,
    noise_only_on_refresh: bool = False,
    **options: Any,
) -> ProblemOptimizer:
    """Build GD, mini-batch SGD or GLD with a structure, from a dynamics name.

    Args:
        dynamics: ``"gd"``, ``"sgd"`` or ``"gld_<structure>"`` (see :func:`dynamics_names`).
        problem: model, loss and data (the optimizer trains the parameters in the problem's θ;
            frozen ones are skipped and listed in ``frozen_parameter_names``).
        lr: step size η.
        seed, generator: randomness of SGD's batches and GLD's noise (the package's rule: the
            generator wins, else a fresh generator seeded with ``seed``, default 0).
        batch_size: b — SGD's batch size, or the b whose Σ_b the GLD structure imitates.
        replacement, refresh_every, noise_only_on_refresh, options: see :class:`GLD`.

    Returns:
        A :class:`GD`, :class:`MinibatchSGD` or :class:`GLD` training the problem's parameters.

    Raises:
        ValueError: an unknown dynamics name (the valid ones are listed), or a bad batch size,
            refresh period or structure option. TypeError: noise options for gd/sgd, or an
            option the structure does not have.
    """
    names = dynamics_names()
    if dynamics not in names:
        raise ValueError(f"unknown dynamics {dynamics!r}; valid names: {', '.join(names)}")
    # The model's parameters: θ's tensors plus the frozen ones (skipped, and reported in
    # frozen_parameter_names); tensors held fixed by a Problem built on a block of θ are left out.
    in_theta = {id(p) for p in problem.trainable_parameters()}
    params = [p for p in problem.model.parameters() if id(p) in in_theta or not p.requires_grad]
    if dynamics in ("gd", "sgd") and options:
        raise TypeError(f"{dynamics!r} takes no noise options, got {sorted(options)}")
    if dynamics == "gd":
        return GD(params, lr, problem=problem)
    generator = resolve_generator(seed, generator)
    if dynamics == "sgd":
        return MinibatchSGD(params, lr, problem=problem, batch_size=batch_size,
                            generator=generator, replacement=replacement)  # fmt: skip
    return GLD(
        params,
        lr,
        noise=dynamics[len("gld_") :],
        problem=problem,
        batch_size=batch_size,
        refresh_every=refresh_every,
        generator=generator,
        replacement=replacement,
        noise_only_on_refresh=noise_only_on_refresh,
        **options,
    )


def run_dynamics(
    optimizer: ProblemOptimizer,
    num_steps: int,
    *,
    callback: Callable[[ProblemOptimizer], Mapping[str, Any] | None] | None = None,
    record_every: int = 1,
) -> list[dict[str, Any]]:
    """Run ``num_steps`` steps of any :class:`ProblemOptimizer`; the one loop GD, SGD and GLD share.

    Every ``record_every`` steps (and after the last), a record is appended: the
    :class:`StepInfo` of that step (``step`` t, ``loss`` at θ_t, …) plus whatever ``callback``
    returns, called *after* the step (so it sees θ_{t+1}; e.g. test accuracy). The callback may
    return ``{"stop": True}`` to end the run early.

    Args:
        optimizer: GD, mini-batch SGD or GLD (see :func:`make_optimizer`).
        num_steps: steps to take (≥ 0). callback: called after each recorded step.
        record_every: record every k-th step (≥ 1).

    Raises:
        ValueError: a negative ``num_steps`` or ``record_every`` < 1; errors of the steps.

    Returns:
        The list of records (plain dicts, JSON-ready).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be a positive int, got {record_every!r}")
    records: list[dict[str, Any]] = []
    for i in range(num_steps):
        optimizer.step()
        if (i + 1) % record_every and i != num_steps - 1:
            continue
        assert optimizer.last is not None
        row = optimizer.last.to_dict()
        extra = callback(optimizer) if callback is not None else None
        if extra:
            row.update(extra)
        records.append(row)
        if extra and extra.get("stop"):
            break
    return records
