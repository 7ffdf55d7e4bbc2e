"""The escape indicator on one-hidden-layer networks (Zhu et al., ICML 2019, Sec. 5.2; poster Fig. 4 left) and
Proposition 2's alignment coefficient a(θ) along training.

Setting (the released ``OneHiddenLayer/gd.py``): N = 1000 points ``x ~ U([−2, 2]²)``, label
``y = 1[x₁ ≥ x₂]``; :class:`~sgdnoise.models.OneHiddenLayerNet` with h hidden ReLU units (first
layer and bias trained, ``D = 3h``), fixed ±1 output weights and the clip
``φ(f) = min(max(f, δ), 1 − δ)``; mean squared loss ``L = (1/N) Σ_i (φ(f(x_i)) − y_i)²``.
Training: full-batch Adam, lr 1e-3, 31 epochs × 10 steps; the learning rate of epoch ``e``
(0-based) is ``lr`` for ``e < E − K`` and ``lr · (E − e)/K`` afterwards (E = 31 epochs, K = 10), i.e.
a linear decay towards 0 that reaches ``lr/10`` in the last epoch, exactly as the released script.
``optimizer="sgd"`` swaps in plain (mini-batch, ``train_batch_size``) SGD with the same schedule.

Measurement, at initialisation (epoch 0) and after every epoch e = 1..E, in ``measure_dtype``
(float64 by default, on a copy of the float32 model):

* ``Tr(H Σ_b)`` and ``Tr(H Σ̄_b) = Tr(H) Tr(Σ_b)/D`` with :func:`sgdnoise.escape_indicator`, exactly
  (no sampling, no Hutch++). ``Σ_b = Σ_1 (N − b)/(b (N − 1))`` is the covariance of the mean
  gradient of a mini-batch of b = 10 samples drawn *without replacement* (as the released code
  draws each batch), ``Σ_1 = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ``. The released code instead estimates
  Σ from 100 random mini-batch gradients (divisor 99); we use the exact population covariance,
  which that estimator is unbiased for. The ratio ``Tr(HΣ)/Tr(HΣ̄)`` does not depend on b or on
  the with/without-replacement factor.
* Proposition 1's alignment coefficient ``a = u₁ᵀΣu₁ · Tr H/(λ₁ Tr Σ)`` with
  :func:`sgdnoise.alignment` (Lanczos on H and Σ).
* Proposition 2's guaranteed lower bound ``r_min²/r_max²``, where ``r_i = φ(f_i) − y_i`` over the
  unclipped samples: with ``g_i = 2 r_i ∇φ_i`` and ``H = (2/N) Σ_i ∇φ_i∇φ_iᵀ`` the uncentred second
  moment ``M = (1/N) Σ g_i g_iᵀ`` satisfies ``u₁ᵀMu₁ ≥ 2 r_min² λ₁`` and ``Tr M ≤ 2 r_max² Tr H``, so
  M is aligned with coefficient ``≥ r_min²/r_max² ≥ δ²/r_max²`` (Σ = M − ḡḡᵀ differs by a term
  that vanishes at a stationary point).
* train loss, accuracy (threshold 0.5), the fraction of unclipped samples, λ₁, Tr H, Tr Σ.

**Exact, cheap Hessian.** ``f`` is piecewise linear in θ and φ is piecewise linear, so
``∇²φ(f(x_i; θ)) = 0`` almost everywhere and the Hessian of the mean squared loss is exactly the
Gauss–Newton matrix ``H = (2/N) J_φᵀ J_φ`` with ``J_φ`` the ``[N, D]`` Jacobian of the clipped
outputs (rows of clipped samples are zero). :class:`OneHiddenLayerProblem` overrides
:meth:`~sgdnoise.Problem.hvp` with this closed form (one vmapped Jacobian per θ, cached), so the
core measurement functions run unchanged but ~100× faster than double backward (one dense H at
D = 1536 takes about a minute with generic HVPs on 2 CPU cores). It is the same matrix that
autograd differentiates (autograd also takes ReLU'' = clip'' = 0): the tests compare it with
``torch.func.hessian`` in float64, and every run compares it with the generic double-backward HVP
on random vectors at the first and last measurement (``hessian_check_rel_err``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Field
from torch.func import grad, vmap

from ..data import one_hidden_layer_data
from ..measures import alignment, escape_indicator
from ..models import OneHiddenLayerNet, one_hidden_layer_loss
from ..problem import Problem
from ._common import (
    Progress,
    RunDir,
    resolve_device,
    resolve_dtype,
    save_figure,
)
from ._protocol import Distinct, ExperimentConfig, experiment_config

__all__ = [
    "PRESETS",
    "IndicatorConfig",
    "OneHiddenLayerProblem",
    "learning_rate",
    "measure",
    "plot",
    "run",
    "train_and_measure",
]

OPTIMIZERS = ("adam", "sgd")
#: Redraws of a dead initialisation (no unclipped sample) before giving up.
MAX_INIT_REDRAWS = 100
#: Hessian cross-check: relative error above which a run stops (the two agree to ~1e-15 in float64).
HESSIAN_CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


_Seeds = Annotated[tuple[Annotated[int, Field(ge=0)], ...], Distinct()]
_Width = Annotated[int, Field(ge=2, multiple_of=2)]
_Delta = Annotated[float, Field(gt=0.0, lt=0.5)]
_DTYPE = Literal["float32", "float64"]


@experiment_config("indicator")
class IndicatorConfig(ExperimentConfig):
    """Configuration of the one-hidden-layer experiment (defaults: the released code's settings);
    every field is a flag of ``sgdnoise indicator`` and a key of its ``--config`` TOML file.

    ``redraw_dead_init``: if no training sample is unclipped at initialisation (every output is
    clipped to δ, so every gradient is 0 and training can never move), the initialisation is drawn
    again from the same generator (up to ``MAX_INIT_REDRAWS`` times) and the number of redraws is
    recorded (``init_redraws``). ``False`` keeps such runs; their curvature quantities are NaN and
    left out of the means.
    """

    widths: Annotated[tuple[_Width, ...], Distinct()] = Field(
        default=(32, 128, 512),
        min_length=1,
        description="hidden widths h, each an even integer >= 2 (half the units get output weight +1, half −1); D = 3h",
    )
    seeds: _Seeds = Field(
        default=(0, 1, 2),
        min_length=1,
        description="initialisation seeds (one run per width and seed)",
    )
    data_seed: Annotated[int, Field(ge=0)] | None = Field(
        default=123,
        description="seed of the data set shared by all runs (the released code's 123); none: a new data set per run",
    )
    num_points: int = Field(default=1000, ge=2, description="N, training points")
    delta: _Delta = Field(
        default=1e-3, description="clipping margin δ of φ, in (0, 0.5) so that δ < 1 − δ"
    )
    optimizer: Literal["adam", "sgd"] = Field(
        default="adam", description="adam (the released code) or sgd (plain SGD / full-batch GD)"
    )
    lr: float = Field(default=1e-3, gt=0, description="base learning rate")
    epochs: int = Field(
        default=31,
        ge=1,
        description="E, epochs (a measurement after each, plus one at initialisation)",
    )
    steps_per_epoch: int = Field(default=10, ge=1, description="optimizer steps per epoch")
    decay_epochs: int = Field(
        default=10,
        ge=0,
        description="K: the lr decays linearly over the last K epochs (0: constant)",
    )
    train_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="mini-batch of the optimizer (without replacement); none: full batch (the released code)",
    )
    noise_batch_size: int = Field(
        default=10, ge=1, description="b of the measured SGD noise Σ_b (the released code's 10)"
    )
    replacement: bool = Field(
        default=False,
        description="measured SGD mini-batches drawn with replacement (the ratio and a do not depend on it)",
    )
    dtype: _DTYPE = Field(
        default="float32", description="training dtype (the released TF code trains in float32)"
    )
    measure_dtype: _DTYPE = Field(
        default="float64", description="dtype of every measurement (a cast copy of model and data)"
    )
    delta_sweep: Annotated[tuple[_Delta, ...], Distinct()] = Field(
        default=(1e-3, 1e-2, 0.05, 0.1, 0.2),
        description="δ values in (0, 0.5) for Proposition 2's δ-dependence of a(θ) (empty: no sweep)",
    )
    delta_sweep_width: _Width = Field(default=32, description="width of the δ-sweep networks")
    delta_sweep_seeds: _Seeds | None = Field(
        default=None, min_length=1, description="seeds of the δ sweep (none: seeds)"
    )
    hessian_check_vectors: int = Field(
        default=4,
        ge=0,
        description="random vectors of the closed-form-vs-autograd Hessian check per run (0: off)",
    )
    lanczos_tol: float | None = Field(
        default=None,
        gt=0,
        description="relative residual tolerance of Lanczos (none: library default)",
    )
    threads: int | None = Field(
        default=1, ge=1, description="torch intra-op threads while running (none: leave as is)"
    )
    redraw_dead_init: bool = Field(default=True, description="redraw an initialisation with no unclipped sample (see above)")  # fmt: skip

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> IndicatorConfig:
        if self.decay_epochs > self.epochs:
            raise ValueError(
                f"decay_epochs must be an integer in [0, epochs] = [0, {self.epochs}], "
                f"got {self.decay_epochs}"
            )
        if self.train_batch_size is not None and self.train_batch_size > self.num_points:
            raise ValueError(
                f"train_batch_size must be none (full batch) or an integer in [1, num_points] = "
                f"[1, {self.num_points}], got {self.train_batch_size}"
            )
        top = self.num_points if self.replacement else self.num_points - 1
        if self.noise_batch_size > top:
            raise ValueError(
                f"noise_batch_size must be in [1, {top}] (without replacement a batch of all N "
                f"samples has no noise), got {self.noise_batch_size}"
            )
        return self

    @property
    def sweep_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.delta_sweep_seeds is None else tuple(self.delta_sweep_seeds)


PRESETS: dict[str, IndicatorConfig] = {
    "smoke": IndicatorConfig(
        widths=(4, 8),
        seeds=(0, 1),
        num_points=100,
        epochs=3,
        steps_per_epoch=2,
        decay_epochs=1,
        delta_sweep=(1e-3, 0.1),
        delta_sweep_width=4,
        delta_sweep_seeds=(0,),
    ),
    "quick": IndicatorConfig(
        seeds=(0, 1, 2), delta_sweep=(1e-3, 1e-2, 0.1), delta_sweep_seeds=(0,)
    ),
    "paper": IndicatorConfig(),
}


# --------------------------------------------------------------------------------------------
# The closed-form exact Hessian
# --------------------------------------------------------------------------------------------


class OneHiddenLayerProblem(Problem):
    """A :class:`~sgdnoise.Problem` for :class:`OneHiddenLayerNet` + MSE with exact, cheap HVPs.

    ``L(θ) = (1/n) Σ_i (φ_i(θ) − y_i)²`` with ``φ_i = φ(f(x_i; θ))`` piecewise linear in θ, so
    ``∇²φ_i = 0`` almost everywhere and ``∇²L = (2/n) Σ_i ∇φ_i ∇φ_iᵀ = (2/n) J_φᵀ J_φ`` exactly
    (the residual term of the Gauss–Newton split vanishes). :meth:`hvp` returns
    ``(2/n) J_φᵀ (J_φ V)`` with the Jacobian ``J_φ`` ``[n, D]`` of the clipped outputs computed by
    one vmapped reverse pass and cached for the last (θ, indices); rows of clipped samples (zero
    gradient) are dropped. Everything else (loss, per-sample gradients, Σ) is the base class's.

    Args:
        model: a :class:`OneHiddenLayerNet` (other models are refused: the identity needs a
            piecewise-linear network and the squared loss).
        inputs, targets: ``[N, 2]`` and ``[N]``.
        chunk_size: as :class:`~sgdnoise.Problem`.
    """

    def __init__(
        self,
        model: OneHiddenLayerNet,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, OneHiddenLayerNet):
            raise TypeError(
                "OneHiddenLayerProblem's closed-form Hessian H = (2/N) JᵀJ holds only for "
                f"OneHiddenLayerNet with the squared loss, got {type(model).__name__}; use "
                "sgdnoise.Problem (generic double-backward Hessian products) for other models"
            )
        super().__init__(model, one_hidden_layer_loss, inputs, targets, chunk_size=chunk_size)
        self._jac_cache: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int] | None = None

    def output_jacobian(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """``J_φ`` ``[n, D]``: row i is ``∇_θ φ(f(x_i; θ))`` (zero for clipped samples)."""
        theta = (self.theta() if theta is None else theta).detach()
        idx = self.check_indices(indices)
        x = self.inputs if idx is None else self.inputs[idx]

        def output(th: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
            return self._outputs(th, xi[None])[0]

        size = self._per_sample_chunk_size()
        parts = [
            vmap(grad(output), in_dims=(None, 0))(theta, x[s : s + size])
            for s in range(0, x.shape[0], size)
        ]
        return torch.cat(parts)

    def _active_jacobian(
        self, theta: torch.Tensor, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        cache = self._jac_cache
        if (
            cache is not None
            and torch.equal(cache[0], theta)
            and (
                (indices is None and cache[1] is None)
                or (
                    indices is not None
                    and cache[1] is not None
                    and cache[1].shape == indices.shape
                    and torch.equal(cache[1], indices)
                )
            )
        ):
            return cache[2], cache[3]
        J = self.output_jacobian(theta, indices)
        n = J.shape[0]
        J = J[(J != 0).any(dim=1)]
        self._jac_cache = (theta.clone(), None if indices is None else indices.clone(), J, n)
        return J, n

    def hvp(
        self,
        V: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``∇²L(θ) V = (2/n) J_φᵀ (J_φ V)`` for ``V`` ``[D, k]`` (exact almost everywhere)."""
        theta = (self.theta() if theta is None else theta).detach()
        J, n = self._active_jacobian(theta, self.check_indices(indices))
        return J.T @ (J @ V) * (2.0 / n)

    def autograd_hvp(
        self,
        V: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The generic double-backward product of :meth:`Problem.hvp` (for cross-checks)."""
        return super().hvp(V, theta, indices)


# --------------------------------------------------------------------------------------------
# Training and measurement
# --------------------------------------------------------------------------------------------


def learning_rate(config: IndicatorConfig, epoch: int) -> float:
    """The released schedule: ``lr`` for ``e < E − K``, then ``lr · (E − e)/K`` (e 0-based)."""
    E, K = config.epochs, config.decay_epochs
    if K == 0 or epoch < E - K:
        return config.lr
    return config.lr * (E - epoch) / K


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _hessian_check(problem: OneHiddenLayerProblem, num: int, seed: int) -> float:
    """Largest relative error of the closed-form HVP against double backward on random vectors."""
    if num == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(problem.dim, num, generator=gen, dtype=torch.float64)
    V = V.to(dtype=problem.dtype, device=problem.device)
    fast, slow = problem.hvp(V), problem.autograd_hvp(V)
    scale = slow.norm(dim=0).clamp_min(torch.finfo(problem.dtype).tiny)
    err = float(((fast - slow).norm(dim=0) / scale).max())
    tol = HESSIAN_CHECK_TOL[problem.dtype]
    if not err <= tol or (slow.norm() == 0 and fast.norm() != 0):
        raise RuntimeError(
            f"the closed-form Hessian (2/N)JᵀJ disagrees with double-backward Hessian products "
            f"(relative error {err:.2e} > {tol:.0e}); the one-hidden-layer identity does not hold "
            "for this model. Please report this with the config."
        )
    return err


def measure(
    model: OneHiddenLayerNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    noise_batch_size: int = 10,
    replacement: bool = False,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | int = 0,
    lanczos_tol: float | None = None,
    hessian_check_vectors: int = 0,
) -> dict[str, float]:
    """All per-epoch quantities at the model's current parameters (the model is not modified).

    Returns a dict with ``tr_HS``, ``tr_HS_iso``, ``ratio``, ``tr_H``, ``tr_S``, ``alignment``
    (a), ``lambda_1``, ``u1_S_u1``, ``overlap`` (top-1 eigenvector overlap of H and Σ),
    ``a_bound`` (``r_min²/r_max²`` over unclipped samples), ``frac_active`` (unclipped fraction),
    ``train_loss``, ``train_accuracy`` and ``hessian_check_rel_err`` (NaN when not checked).
    With no unclipped sample H = 0 and the curvature quantities are NaN.
    """
    m = copy.deepcopy(model).to(dtype)
    problem = OneHiddenLayerProblem(m, x.to(dtype), y.to(dtype))
    D = problem.dim
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator()
    if not isinstance(generator, torch.Generator):
        gen.manual_seed(int(generator))
    with torch.no_grad():
        out = m(problem.inputs)
    r = out - problem.targets
    active = (problem.output_jacobian() != 0).any(dim=1)
    nan = float("nan")
    row: dict[str, float] = {
        "train_loss": float((r**2).mean()),
        "train_accuracy": float(((out > 0.5).to(r.dtype) == problem.targets).to(r.dtype).mean()),
        "frac_active": float(active.to(r.dtype).mean()),
    }
    ra = r[active].abs()
    row["a_bound"] = float((ra.min() / ra.max()) ** 2) if ra.numel() else nan
    row["hessian_check_rel_err"] = _hessian_check(
        problem, hessian_check_vectors, int(torch.randint(2**31 - 1, (1,), generator=gen))
    )
    if not bool(active.any()):  # every sample clipped: H = 0, ratio and a undefined
        keys = ("tr_HS", "tr_HS_iso", "ratio", "tr_H", "tr_S", "alignment", "lambda_1")
        row.update(dict.fromkeys(keys, nan), u1_S_u1=nan, overlap=nan)
        return row
    ei = escape_indicator(
        problem,
        noise_batch_size,
        replacement=replacement,
        block_size=256,
        exact_trace_max_dim=D,
        generator=gen,
    )
    al = alignment(
        problem,
        noise_batch_size,
        1,
        generator=gen,
        replacement=replacement,
        tol=lanczos_tol,
        exact_trace_max_dim=D,
    )
    row.update(
        tr_HS=ei.tr_HS,
        tr_HS_iso=ei.tr_HS_iso,
        ratio=ei.ratio,
        tr_H=ei.tr_H,
        tr_S=ei.tr_S,
        alignment=al.a,
        lambda_1=al.lambda_1,
        u1_S_u1=al.u1_S_u1,
        overlap=al.overlap,
    )
    return row


def unclipped(model: OneHiddenLayerNet, x: torch.Tensor) -> torch.Tensor:
    """Mask ``[N]`` of samples whose output is not clipped, ``δ < f(x) < 1 − δ`` (the only ones
    with a nonzero gradient)."""
    with torch.no_grad():
        out = model(x)
    return (out > model.delta) & (out < 1.0 - model.delta)


def train_and_measure(
    width: int,
    seed: int,
    delta: float,
    config: IndicatorConfig,
    *,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Train one network as the released code does and measure it after every epoch.

    Returns one row per measurement (epoch 0 = initialisation, epoch e = after e epochs). A dead
    initialisation is redrawn when ``config.redraw_dead_init`` (see :class:`IndicatorConfig`).
    """
    dev = torch.device(device)
    N = config.num_points
    tdtype, mdtype = resolve_dtype(config.dtype), resolve_dtype(config.measure_dtype)
    data_seed = seed if config.data_seed is None else config.data_seed
    x, y = one_hidden_layer_data(
        config.num_points, generator=torch.Generator().manual_seed(data_seed), dtype=tdtype
    )
    x, y = x.to(dev), y.to(dev)
    init_gen = torch.Generator().manual_seed(seed)
    model = OneHiddenLayerNet(width, generator=init_gen, delta=delta, dtype=tdtype, device=dev)
    redraws = 0
    while config.redraw_dead_init and not bool(unclipped(model, x).any()):
        if redraws == MAX_INIT_REDRAWS:
            raise RuntimeError(
                f"every one of {MAX_INIT_REDRAWS + 1} initialisations of width {width} with δ = "
                f"{delta} clips all {N} outputs (zero gradient); lower δ or change the seed"
            )
        model.reset_parameters(generator=init_gen)
        redraws += 1
    params = [model.weight, model.bias]
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
    else:
        opt = torch.optim.SGD(params, lr=config.lr)
    batch_gen = torch.Generator().manual_seed(seed + 7919)
    measure_gen = torch.Generator().manual_seed(seed * 1_000_003 + width)

    def record(epoch: int, lr: float | None) -> dict[str, Any]:
        last = epoch in (0, config.epochs)
        row = measure(
            model,
            x,
            y,
            noise_batch_size=config.noise_batch_size,
            replacement=config.replacement,
            dtype=mdtype,
            generator=measure_gen,
            lanczos_tol=config.lanczos_tol,
            hessian_check_vectors=config.hessian_check_vectors if last else 0,
        )
        return {"width": width, "dim": 3 * width, "seed": seed, "delta": delta, "epoch": epoch,
                "lr": lr, "init_redraws": redraws, **row}  # fmt: skip

    rows = [record(0, None)]
    for epoch in range(config.epochs):
        lr = learning_rate(config, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(config.steps_per_epoch):
            if config.train_batch_size is None:
                xb, yb = x, y
            else:
                idx = torch.randperm(N, generator=batch_gen)[: config.train_batch_size].to(dev)
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss = one_hidden_layer_loss(model(xb), yb)
            loss.backward()
            opt.step()
        rows.append(record(epoch + 1, lr))
    return rows


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------

CURVE_KEYS = (
    "tr_HS",
    "tr_HS_iso",
    "ratio",
    "alignment",
    "a_bound",
    "lambda_1",
    "tr_H",
    "tr_S",
    "overlap",
    "frac_active",
    "train_loss",
    "train_accuracy",
)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof 1; ``None`` for a single value) of the finite values."""
    v = [float(a) for a in values if a is not None and math.isfinite(a)]
    if not v:
        return float("nan"), None
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, None
    return mean, math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))


def _finite_min(values: list[float]) -> float:
    v = [float(a) for a in values if a is not None and math.isfinite(a)]
    return min(v) if v else float("nan")


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(v)


def _aggregate(rows: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """Mean ± std over seeds of one (width, δ) group: final values and per-epoch curves.

    A run whose network ends *dead* (every output clipped, so zero gradient, H = 0 and an
    undefined ratio) is listed in ``seeds_dead`` with the epoch it died, and every statistic is
    taken over the live seeds only (``seeds_live``; all seeds if none is live), so that the curves
    average one fixed set of runs.
    """
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["epoch"]): r for r in rows}
    live = [s for s in seeds if _finite(by[(s, epochs)]["ratio"])]
    dead = [s for s in seeds if s not in live]
    use = live or seeds
    final = [by[(s, epochs)] for s in use]
    out: dict[str, Any] = {
        "width": rows[0]["width"],
        "dim": rows[0]["dim"],
        "delta": rows[0]["delta"],
        "seeds": seeds,
        "seeds_live": live,
        "seeds_dead": dead,
        "dead_since_epoch": {
            str(s): min(
                e
                for e in range(epochs + 1)
                if all(not _finite(by[(s, f)]["ratio"]) for f in range(e, epochs + 1))
            )
            for s in dead
        },
        "dead_train_accuracy_final": [by[(s, epochs)]["train_accuracy"] for s in dead],
        "num_valid_final": len(live),
        "init_redraws_per_seed": [by[(s, 0)]["init_redraws"] for s in seeds],
    }
    for key in CURVE_KEYS:
        mean, std = _mean_std([r[key] for r in final])
        out[f"{key}_final"] = mean
        out[f"{key}_final_std"] = std
        out[f"{key}_final_per_seed"] = [r[key] for r in final]
    out["ratio_over_dim_final"] = out["ratio_final"] / out["dim"]
    use_rows = [r for r in rows if r["seed"] in use]
    out["alignment_min"] = _finite_min([r["alignment"] for r in use_rows])
    out["alignment_min_trained"] = _finite_min(
        [r["alignment"] for r in use_rows if r["epoch"] >= 1]
    )
    out["a_bound_min"] = _finite_min([r["a_bound"] for r in use_rows])
    checks = [r["hessian_check_rel_err"] for r in rows]
    out["hessian_check_max_rel_err"] = max((c for c in checks if _finite(c)), default=None)
    curves: dict[str, list[Any]] = {"epoch": list(range(epochs + 1))}
    for key in CURVE_KEYS:
        means, stds = [], []
        for e in range(epochs + 1):
            m, sd = _mean_std([by[(s, e)][key] for s in use])
            means.append(m)
            stds.append(sd)
        curves[f"{key}_mean"] = means
        curves[f"{key}_std"] = stds
    out["curves"] = curves
    return out


def _loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def _units(config: IndicatorConfig) -> list[tuple[str, int, float, int]]:
    """(group, width, δ, seed) training runs; δ-sweep runs already in the main grid are shared."""
    units = [("widths", w, config.delta, s) for w in config.widths for s in config.seeds]
    have = {(w, d, s) for _, w, d, s in units}
    for d in config.delta_sweep:
        for s in config.sweep_seeds:
            if (config.delta_sweep_width, d, s) not in have:
                units.append(("delta_sweep", config.delta_sweep_width, d, s))
                have.add((config.delta_sweep_width, d, s))
    return units


def run(
    config: IndicatorConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    preset: str | None = None,
) -> dict[str, Any]:
    """Run the experiment and write the run directory; returns ``results.json``'s content.

    ``results.json`` maps each width (a string) to ``ratio_final`` (mean over seeds of the final
    ``Tr(HΣ)/Tr(HΣ̄)``), ``tr_HS_final``, ``tr_HS_iso_final``, ``alignment_final`` (each with
    ``*_std``, the sample std over seeds, and ``*_per_seed``), the other final quantities,
    ``alignment_min`` (over all epochs and seeds) and ``curves`` (per-epoch mean and std).
    ``analysis.json`` holds the log-log slope of the final ratio against D and the δ sweep
    (Proposition 2). Also written: ``config.json``, ``env.json``, ``metrics.jsonl``/``.csv`` (one
    row per width, δ, seed and epoch), ``meta.json`` (timings), ``summary.md`` and the figures
    ``indicator`` (poster Fig. 4 left), ``indicator_ratio`` and ``prop2_alignment`` (PNG + SVG).

    Resuming: if ``out_dir`` holds a run with the same config, its finished training runs are
    kept and only the missing ones are computed.
    """
    config = config.validate()
    dev = resolve_device(device)
    rd = RunDir(out_dir)
    rd.clear_complete()
    t0 = time.perf_counter()
    cfg = {**dataclasses.asdict(config), "device": str(dev), "preset": preset}
    rows: list[dict[str, Any]] = []
    old = rd.read_json_or_quarantine("config.json") if rd.exists("metrics.jsonl") else None
    if isinstance(old, dict):
        same = {k: v for k, v in old.items() if k not in ("device", "preset")} == {
            k: v for k, v in _json_roundtrip(cfg).items() if k not in ("device", "preset")
        }
        if same:
            rows = rd.read_jsonl("metrics.jsonl")
    rd.write_config(cfg)
    rd.write_env(dev)

    units = _units(config)
    done = {(r["width"], r["delta"], r["seed"]) for r in rows if r["epoch"] == config.epochs}
    rows = [r for r in rows if (r["width"], r["delta"], r["seed"]) in done]
    timings: dict[str, float] = {}
    # A training run's cost grows about linearly with D = 3h (every product is over all of θ):
    # the ETA weights each run by its width, and kept runs shorten the work without time.
    bar = Progress(len(units), "indicator", enabled=progress,
                   work_total=sum(w for _, w, _, _ in units))  # fmt: skip
    with _num_threads(config.threads):
        for group, width, delta, seed in units:
            if (width, delta, seed) in done:
                bar.skip(1, work=width, postfix=f"h={width} δ={delta:g} seed={seed} (kept)")
                continue
            t1 = time.perf_counter()
            new = train_and_measure(width, seed, delta, config, device=dev)
            for r in new:
                r["group"] = group
            rows.extend(new)
            timings[f"h={width},delta={delta:g},seed={seed}"] = time.perf_counter() - t1
            rd.write_jsonl("metrics.jsonl", rows)
            last = new[-1]
            bar.update(1, work=width,
                       postfix=f"h={width} δ={delta:g} seed={seed}: ratio {last['ratio']:.1f}")  # fmt: skip

    results, analysis = _collect(config, rows)
    elapsed = time.perf_counter() - t0
    rd.write_json("results.json", results)
    rd.write_json("analysis.json", analysis)
    rd.write_csv("metrics.csv", rows)
    meta = {"seconds": elapsed, "runs_computed": len(timings), "runs_total": len(units),
            "unit_seconds": timings, "device": str(dev)}  # fmt: skip
    rd.write_json("meta.json", meta)
    rd.write_text("summary.md", _summary(config, results, analysis, meta))
    plot(rd.path)
    rd.mark_complete("indicator", config)
    return results


def _json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists), to compare configs."""
    import json

    from .._utils import _jsonable

    return json.loads(json.dumps(_jsonable(obj)))


def _collect(
    config: IndicatorConfig, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, Any] = {}
    for w in config.widths:
        grp = [r for r in rows if r["width"] == w and r["delta"] == config.delta]
        grp = [r for r in grp if r["seed"] in config.seeds]
        results[str(w)] = _aggregate(grp, config.epochs)
    dims = [results[str(w)]["dim"] for w in config.widths]
    slope = _loglog_slope(dims, [results[str(w)]["ratio_final"] for w in config.widths])
    sweep: dict[str, Any] = {}
    for d in config.delta_sweep:
        grp = [
            r
            for r in rows
            if r["width"] == config.delta_sweep_width
            and r["delta"] == d
            and r["seed"] in config.sweep_seeds
        ]
        sweep[f"{d:g}"] = _aggregate(grp, config.epochs)
    analysis = {
        "ratio_vs_dim_loglog_slope": slope,
        "dims": dims,
        "delta_sweep_width": config.delta_sweep_width if config.delta_sweep else None,
        "delta_sweep": sweep,
    }
    return results, analysis


# --------------------------------------------------------------------------------------------
# Summary and figures
# --------------------------------------------------------------------------------------------


def _pm(mean: float, std: float | None, fmt: str = ".3g") -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


def _dead_notes(groups: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for name, r in groups.items():
        for s in r["seeds_dead"]:
            since = r["dead_since_epoch"][str(s)]
            notes.append(
                f"- {name}, seed {s}: every output clipped from epoch {since} on (zero gradient, "
                f"H = 0, ratio undefined; final train accuracy "
                f"{r['dead_train_accuracy_final'][r['seeds_dead'].index(s)]:.3f}); left out of "
                "the means."
            )
    redrawn = [
        f"{name} seed {s} ({k}×)"
        for name, r in groups.items()
        for s, k in zip(r["seeds"], r["init_redraws_per_seed"], strict=True)
        if k
    ]
    if redrawn:
        notes.append(
            "- Dead initialisations redrawn (all outputs clipped at init): " + ", ".join(redrawn)
        )
    return (["", "Dead networks (the clip's zero gradient can switch every sample off):", *notes]
            if notes else [])  # fmt: skip


def _summary(
    config: IndicatorConfig, results: dict[str, Any], analysis: dict[str, Any], meta: dict[str, Any]
) -> str:
    opt = "Adam" if config.optimizer == "adam" else "SGD"
    batch = "full batch" if config.train_batch_size is None else f"batch {config.train_batch_size}"
    lines = [
        "# Escape indicator on one-hidden-layer networks (poster Fig. 4 left)",
        "",
        f"{opt} ({batch}), lr {config.lr:g}, {config.epochs} epochs × {config.steps_per_epoch} "
        f"steps (lr decays linearly over the last {config.decay_epochs}), δ = {config.delta:g}, "
        f"N = {config.num_points}, seeds {list(config.seeds)}. Σ is the exact covariance of a "
        f"mini-batch gradient of b = {config.noise_batch_size} samples drawn "
        f"{'with' if config.replacement else 'without'} replacement; the ratio and a do not "
        f"depend on b. Measured in {config.measure_dtype}; Tr(H) exact. Mean ± sample std over "
        "the live seeds at the final epoch.",
        "",
        "| h | D | Tr(HΣ)/Tr(HΣ̄) | ratio / D | Tr(HΣ) | Tr(HΣ̄) | a | min a (training) "
        "| train loss | train acc | live seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in config.widths:
        r = results[str(w)]
        lines.append(
            f"| {w} | {r['dim']} | {_pm(r['ratio_final'], r['ratio_final_std'])} | "
            f"{r['ratio_over_dim_final']:.3f} | {_pm(r['tr_HS_final'], r['tr_HS_final_std'])} | "
            f"{_pm(r['tr_HS_iso_final'], r['tr_HS_iso_final_std'])} | "
            f"{_pm(r['alignment_final'], r['alignment_final_std'])} | "
            f"{r['alignment_min']:.3g} | "
            f"{_pm(r['train_loss_final'], r['train_loss_final_std'])} | "
            f"{_pm(r['train_accuracy_final'], r['train_accuracy_final_std'])} | "
            f"{r['num_valid_final']}/{len(r['seeds'])} |"
        )
    lines += _dead_notes({f"h = {w}": results[str(w)] for w in config.widths})
    slope = analysis["ratio_vs_dim_loglog_slope"]
    lines += [
        "",
        "Log-log slope of the final ratio against D: "
        + ("n/a (one width)" if slope is None else f"{slope:.3f}")
        + " (a ratio ∝ D gives 1). A re-simulation of the released script gave "
        "about 0.4·D (≈ 40 / 170 / 650 for D = 96 / 384 / 1536); the paper states no number.",
    ]
    if analysis["delta_sweep"]:
        lines += [
            "",
            f"## Proposition 2: a(θ) against δ (h = {analysis['delta_sweep_width']})",
            "",
            "a = u₁ᵀΣu₁·Tr H/(λ₁ Tr Σ); the bound r_min²/r_max² (unclipped residuals, ≥ δ²/r_max²) "
            "is what Proposition 2's argument guarantees for the uncentred second moment.",
            "",
            "| δ | a (final) | min a over training | bound r_min²/r_max² (final) | unclipped "
            "fraction | train loss | ratio | live seeds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d, r in analysis["delta_sweep"].items():
            lines.append(
                f"| {d} | {_pm(r['alignment_final'], r['alignment_final_std'])} | "
                f"{r['alignment_min']:.3g} | {_pm(r['a_bound_final'], r['a_bound_final_std'])} | "
                f"{_pm(r['frac_active_final'], r['frac_active_final_std'])} | "
                f"{_pm(r['train_loss_final'], r['train_loss_final_std'])} | "
                f"{_pm(r['ratio_final'], r['ratio_final_std'])} | "
                f"{r['num_valid_final']}/{len(r['seeds'])} |"
            )
        lines += _dead_notes({f"δ = {d}": r for d, r in analysis["delta_sweep"].items()})
    checks = [results[str(w)]["hessian_check_max_rel_err"] for w in config.widths]
    checks = [c for c in checks if c is not None]
    if checks:
        lines += [
            "",
            f"Closed-form Hessian (2/N)JᵀJ vs double-backward products: max relative error "
            f"{max(checks):.1e} over {config.hessian_check_vectors} random vectors at the first "
            "and last measurement of every run.",
        ]
    lines += [
        "",
        f"Wall time: {meta['seconds']:.1f} s on {meta['device']}, computing "
        f"{meta['runs_computed']} of {meta['runs_total']} training runs (the others were kept "
        "from an earlier, identical run in this directory).",
        "",
    ]
    return "\n".join(lines)


def _band(ax: Any, x: list[int], mean: list[float], std: list[Any], color: Any, **kw: Any) -> None:
    import numpy as np

    m = np.array([np.nan if v is None else v for v in mean], dtype=float)
    s = np.array([0.0 if v is None else v for v in std], dtype=float)
    ax.plot(x, m, color=color, **kw)
    if np.any(s > 0):
        lo = np.where(m - s > 0, m - s, m)  # keep log axes valid
        ax.fill_between(x, lo, m + s, color=color, alpha=0.15, linewidth=0)


def _plain_log_ticks(ax: Any, which: str = "y") -> None:
    """Plain ``%g`` tick labels on a log axis, at 1-2-5 steps when it spans under two decades
    (the default mathtext labels take seconds to lay out on a busy CPU). Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 100:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot(run_dir: str | Path) -> list[Path]:
    """Redraw the figures of a run directory from its saved results (no recomputation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = RunDir(run_dir)
    results = rd.read_json("results.json")
    analysis = rd.read_json("analysis.json") if rd.exists("analysis.json") else {}
    config = rd.read_json("config.json")
    widths = sorted(results, key=int)
    colors = plt.get_cmap("viridis")(
        [0.1 + 0.75 * i / max(1, len(widths) - 1) for i in range(len(widths))]
    )
    written: list[Path] = []

    # Poster Fig. 4 left: Tr(HΣ) solid, Tr(HΣ̄) dotted, log scale.
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for w, c in zip(widths, colors, strict=True):
        cv = results[w]["curves"]
        _band(ax, cv["epoch"], cv["tr_HS_mean"], cv["tr_HS_std"], c, lw=1.8,
              label=f"h = {w}: Tr(HΣ)")  # fmt: skip
        _band(ax, cv["epoch"], cv["tr_HS_iso_mean"], cv["tr_HS_iso_std"], c, lw=1.8, ls=":",
              label=f"h = {w}: Tr(H$\\bar{{\\Sigma}}$)")  # fmt: skip
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"escape indicator (Σ for batch size {config.get('noise_batch_size', 10)})")
    ax.set_title("SGD noise vs isotropic equivalent, one hidden layer")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    written += save_figure(fig, rd / "indicator")

    # Ratio along training and against D.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for w, c in zip(widths, colors, strict=True):
        cv = results[w]["curves"]
        _band(a1, cv["epoch"], cv["ratio_mean"], cv["ratio_std"], c, lw=1.8, label=f"h = {w}")
    a1.set_yscale("log")
    _plain_log_ticks(a1)
    a1.set_xlabel("epoch")
    a1.set_ylabel("Tr(HΣ) / Tr(H$\\bar{\\Sigma}$)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3, which="both")
    dims = [results[w]["dim"] for w in widths]
    ratios = [results[w]["ratio_final"] for w in widths]
    errs = [results[w]["ratio_final_std"] or 0.0 for w in widths]
    a2.errorbar(dims, ratios, yerr=errs, fmt="o-", color="k", capsize=3, label="final ratio")
    slope = analysis.get("ratio_vs_dim_loglog_slope")
    a2.set_xscale("log")
    a2.set_yscale("log")
    _plain_log_ticks(a2, "x")
    _plain_log_ticks(a2, "y")
    a2.set_xlabel("D = 3h")
    a2.set_ylabel("final Tr(HΣ) / Tr(H$\\bar{\\Sigma}$)")
    a2.set_title("" if slope is None else f"log-log slope {slope:.2f}")
    a2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    written += save_figure(fig, rd / "indicator_ratio")

    # Proposition 2: a along training (widths), a along training (δ), final a vs δ.
    sweep = analysis.get("delta_sweep") or {}
    ncols = 3 if sweep else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    for w, c in zip(widths, colors, strict=True):
        cv = results[w]["curves"]
        _band(ax, cv["epoch"], cv["alignment_mean"], cv["alignment_std"], c, lw=1.8,
              label=f"h = {w}")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("a = u₁ᵀΣu₁ · Tr H / (λ₁ Tr Σ)")
    ax.set_title(f"alignment along training (δ = {config.get('delta')})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if sweep:
        deltas = list(sweep)
        dcol = plt.get_cmap("plasma")(
            [0.1 + 0.75 * i / max(1, len(deltas) - 1) for i in range(len(deltas))]
        )
        ax = axes[0, 1]
        for d, c in zip(deltas, dcol, strict=True):
            cv = sweep[d]["curves"]
            _band(ax, cv["epoch"], cv["alignment_mean"], cv["alignment_std"], c, lw=1.8,
                  label=f"δ = {d}")  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("a")
        ax.set_title(f"alignment vs δ (h = {analysis.get('delta_sweep_width')})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[0, 2]
        dv = [float(d) for d in deltas]
        a_fin = [sweep[d]["alignment_final"] for d in deltas]
        a_err = [sweep[d]["alignment_final_std"] or 0.0 for d in deltas]
        a_min = [sweep[d]["alignment_min"] for d in deltas]
        bound = [sweep[d]["a_bound_final"] for d in deltas]
        ax.errorbar(dv, a_fin, yerr=a_err, fmt="o-", capsize=3, label="a (final)")
        ax.plot(dv, a_min, "s--", label="min a over training")
        ax.plot(dv, bound, "^:", label="bound r²_min/r²_max (final)")
        ax.plot(dv, [d * d for d in dv], color="gray", lw=0.8, label="δ² (the bound for r_max ≤ 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax, "x")
        _plain_log_ticks(ax, "y")
        ax.set_xlabel("δ")
        ax.set_ylabel("alignment coefficient")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    written += save_figure(fig, rd / "prop2_alignment")
    return written
