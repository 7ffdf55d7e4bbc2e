"""The escape indicator on one-hidden-layer networks (Zhu et al., ICML 2019, Sec. 5.2; poster Fig. 4 left) and
Proposition 2's alignment coefficient a(θ) along training.

Setting (the released ``OneHiddenLayer/gd.py``): N = 1000 points ``x ~ U([−2, 2]²)``, label
``y = 1[x₁ ≥ x₂]``; :class:`~sgdnoise.models.OneHiddenLayerNet` with h hidden ReLU units (first
layer and bias trained, ``D = 3h``), fixed ±1 output weights and the clip
``φ(f) = min(max(f, δ), 1 − δ)``; mean squared loss ``L = (1/N) Σ_i (φ(f(x_i)) − y_i)²``.
Training: full-batch Adam, lr 1e-3, 31 epochs × 10 steps; the learning rate of epoch ``e``
(0-based) is ``lr`` for ``e < E − K`` and ``lr · (E − e)/K`` afterwards (E = 31, K = 10), exactly as
the released script. ``optimizer="sgd"`` swaps in plain (mini-batch) SGD with the same schedule.

Measurement, at initialisation and after every epoch, in ``measure_dtype`` (float64 by default,
on a copy of the float32 model):

* ``Tr(H Σ_b)`` and ``Tr(H Σ̄_b) = Tr(H) Tr(Σ_b)/D`` with :func:`sgdnoise.tr_HS` on the operators, exactly.
  ``Σ_b = Σ_1 (N − b)/(b (N − 1))`` is the covariance of the mean gradient of a mini-batch of
  b = 10 samples drawn without replacement, ``Σ_1 = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ`` (the released
  code estimates Σ from 100 mini-batch gradients; we use the population covariance, which that
  estimator is unbiased for). The ratio does not depend on b or on the sampling factor.
* Proposition 1's alignment coefficient ``a = u₁ᵀΣu₁ · Tr H/(λ₁ Tr Σ)`` (:func:`sgdnoise.alignment`).
* Proposition 2's guaranteed lower bound ``r_min²/r_max²`` over the unclipped residuals
  ``r_i = φ(f_i) − y_i``: with ``g_i = 2 r_i ∇φ_i`` and ``H = (2/N) Σ_i ∇φ_i∇φ_iᵀ`` the uncentred
  second moment ``M = (1/N) Σ g_i g_iᵀ`` has ``u₁ᵀMu₁ ≥ 2 r_min² λ₁`` and ``Tr M ≤ 2 r_max² Tr H``.
* train loss, accuracy (threshold 0.5), the unclipped fraction, λ₁, Tr H, Tr Σ.

**Exact, cheap Hessian.** ``φ(f(x; θ))`` is piecewise linear in θ (ReLU, clip, fixed output
weights), so the Hessian of the squared loss is exactly its Gauss–Newton matrix
``H = (2/N) J_φᵀ J_φ`` almost everywhere (autograd also takes ReLU'' = clip'' = 0).
:func:`sgdnoise.linalg.gauss_newton` (dense route: one vmapped Jacobian per θ, clipped rows
dropped) gives it ~100× faster than double backward; every run compares it with the generic
double-backward products on random vectors at the first and last measurement
(``hessian_check_rel_err``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Field

from .._stats import finite_min, is_finite, loglog_slope, mean_std
from .._utils import as_generator
from ..config import Distinct, ExperimentConfig, experiment_config
from ..data import one_hidden_layer_data
from ..figures.indicator import summary_markdown
from ..linalg import LinearOperator, gauss_newton, gradient_noise_covariance, tr_HS
from ..measures import alignment
from ..models import OneHiddenLayerNet, one_hidden_layer_loss
from ..problem import Problem
from ..runs import Progress, RunDir, config_identity, num_threads, resolve_device, resolve_dtype

__all__ = [
    "PRESETS",
    "IndicatorConfig",
    "learning_rate",
    "measure",
    "run",
    "train_and_measure",
]

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
    batch_size: int = Field(
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
    redraw_dead_init: bool = Field(default=True, description="redraw an initialisation whose outputs are all clipped (zero gradient), as the released code does")  # fmt: skip

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
        if self.batch_size > top:
            raise ValueError(
                f"batch_size must be in [1, {top}] (without replacement a batch of all N "
                f"samples has no noise), got {self.batch_size}"
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
# Training and measurement
# --------------------------------------------------------------------------------------------


def learning_rate(config: IndicatorConfig, epoch: int) -> float:
    """The released schedule: ``lr`` for ``e < E − K``, then ``lr · (E − e)/K`` (e 0-based)."""
    E, K = config.epochs, config.decay_epochs
    if K == 0 or epoch < E - K:
        return config.lr
    return config.lr * (E - epoch) / K


def _hessian_check(problem: Problem, H: LinearOperator, num: int, seed: int) -> float:
    """Largest relative error of ``H @ V`` against double-backward products on random vectors."""
    if num == 0:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(problem.dim, num, generator=gen, dtype=torch.float64)
    V = V.to(dtype=problem.dtype, device=problem.device)
    fast, slow = H @ V, problem.hvp(V)
    scale = slow.norm(dim=0).clamp_min(torch.finfo(problem.dtype).tiny)
    err = float(((fast - slow).norm(dim=0) / scale).max())
    tol = HESSIAN_CHECK_TOL[problem.dtype]
    if not err <= tol or (slow.norm() == 0 and fast.norm() != 0):
        raise RuntimeError(
            f"the Gauss–Newton matrix (2/N)JᵀJ disagrees with double-backward Hessian products "
            f"(relative error {err:.2e} > {tol:.0e}); the one-hidden-layer identity does not hold "
            "for this model. Please report this with the config."
        )
    return err


def _curvature(
    problem: Problem, H: LinearOperator, b: int, replacement: bool, gen: torch.Generator,
    tol: float | None,
) -> dict[str, float]:  # fmt: skip
    """Tr(HΣ_b), Tr(HΣ̄_b), their ratio, Tr H, Tr Σ_b and the alignment (λ₁, u₁ᵀΣu₁, overlap)."""
    D = problem.dim
    S = gradient_noise_covariance(problem, b, replacement=replacement)
    al = alignment(H, S, 1, generator=gen, tol=tol, exact_trace_max_dim=D)  # Tr H exact (D ≤ max)
    tr = float(tr_HS(H, S, block_size=256, generator=gen))  # exact: Σ_b's N centred rows
    iso = al.tr_H * al.tr_S / D
    return {"tr_HS": tr, "tr_HS_iso": iso, "ratio": tr / iso, "tr_H": al.tr_H, "tr_S": al.tr_S,
            "alignment": al.a, "lambda_1": al.lambda_1, "u1_S_u1": al.u1_S_u1,
            "overlap": al.overlap}  # fmt: skip


def measure(
    model: OneHiddenLayerNet,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 10,
    replacement: bool = False,
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | int = 0,
    lanczos_tol: float | None = None,
    hessian_check_vectors: int = 0,
) -> dict[str, float]:
    """All per-epoch quantities at the model's current parameters (the model is not modified).

    H is the Gauss–Newton operator of a plain :class:`~sgdnoise.Problem` (exactly the Hessian
    here, see the module docstring), Σ_b the exact covariance of a mini-batch gradient.

    Args:
        model: the network (copied and cast to ``dtype``).
        x, y: inputs ``[N, 2]`` and targets ``[N]`` in {0, 1}.
        batch_size: b of Σ_b. replacement: SGD's sampling of mini-batches.
        dtype: dtype of the measurement. generator: randomness of the Lanczos solves.
        lanczos_tol: Lanczos tolerance (``None``: library default).
        hessian_check_vectors: random vectors of the Gauss–Newton vs double-backward check.

    Returns:
        A dict with ``tr_HS``, ``tr_HS_iso``, ``ratio``, ``tr_H``, ``tr_S``, ``alignment`` (a),
        ``lambda_1``, ``u1_S_u1``, ``overlap`` (top-1 eigenvector overlap of H and Σ),
        ``a_bound`` (``r_min²/r_max²`` over unclipped samples), ``frac_active`` (unclipped
        fraction), ``train_loss``, ``train_accuracy`` and ``hessian_check_rel_err`` (NaN when not
        checked). With no unclipped sample H = 0 and the curvature quantities are NaN.

    Raises:
        RuntimeError: if the Gauss–Newton products disagree with double backward.
    """
    m = copy.deepcopy(model).to(dtype)
    problem = Problem(m, one_hidden_layer_loss, x.to(dtype), y.to(dtype))
    H = gauss_newton(problem, dense=True)
    gen = as_generator(generator)
    with torch.no_grad():
        out = m(problem.inputs)
    r = out - problem.targets
    active = (H.jacobian()[0].reshape(problem.num_samples, -1) != 0).any(dim=1)
    nan = float("nan")
    row: dict[str, float] = {
        "train_loss": float((r**2).mean()),
        "train_accuracy": float(((out > 0.5).to(r.dtype) == problem.targets).to(r.dtype).mean()),
        "frac_active": float(active.to(r.dtype).mean()),
    }
    ra = r[active].abs()
    row["a_bound"] = float((ra.min() / ra.max()) ** 2) if ra.numel() else nan
    row["hessian_check_rel_err"] = _hessian_check(
        problem, H, hessian_check_vectors, int(torch.randint(2**31 - 1, (1,), generator=gen))
    )
    if not bool(active.any()):  # every sample clipped: H = 0, ratio and a undefined
        keys = ("tr_HS", "tr_HS_iso", "ratio", "tr_H", "tr_S", "alignment", "lambda_1")
        row.update(dict.fromkeys(keys, nan), u1_S_u1=nan, overlap=nan)
        return row
    row.update(_curvature(problem, H, batch_size, replacement, gen, lanczos_tol))
    return row


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
    if config.redraw_dead_init:
        redraws = model.redraw_while_dead(x, generator=init_gen, max_redraws=MAX_INIT_REDRAWS)
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
            batch_size=config.batch_size,
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


def _aggregate(rows: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """Mean ± std over seeds of one (width, δ) group: final values and per-epoch curves.

    A run whose network ends *dead* (every output clipped, so zero gradient, H = 0 and an
    undefined ratio) is listed in ``seeds_dead`` with the epoch it died, and every statistic is
    taken over the live seeds only (``seeds_live``; all seeds if none is live), so that the curves
    average one fixed set of runs.
    """
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["epoch"]): r for r in rows}
    live = [s for s in seeds if is_finite(by[(s, epochs)]["ratio"])]
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
                if all(not is_finite(by[(s, f)]["ratio"]) for f in range(e, epochs + 1))
            )
            for s in dead
        },
        "dead_train_accuracy_final": [by[(s, epochs)]["train_accuracy"] for s in dead],
        "num_valid_final": len(live),
        "init_redraws_per_seed": [by[(s, 0)]["init_redraws"] for s in seeds],
    }
    for key in CURVE_KEYS:
        mean, std = mean_std([r[key] for r in final], empty=math.nan)
        out[f"{key}_final"] = mean
        out[f"{key}_final_std"] = std
        out[f"{key}_final_per_seed"] = [r[key] for r in final]
    out["ratio_over_dim_final"] = out["ratio_final"] / out["dim"]
    use_rows = [r for r in rows if r["seed"] in use]
    out["alignment_min"] = finite_min([r["alignment"] for r in use_rows])
    out["alignment_min_trained"] = finite_min([r["alignment"] for r in use_rows if r["epoch"] >= 1])
    out["a_bound_min"] = finite_min([r["a_bound"] for r in use_rows])
    checks = [r["hessian_check_rel_err"] for r in rows]
    out["hessian_check_max_rel_err"] = max((c for c in checks if is_finite(c)), default=None)
    curves: dict[str, list[Any]] = {"epoch": list(range(epochs + 1))}
    for key in CURVE_KEYS:
        means, stds = [], []
        for e in range(epochs + 1):
            m, sd = mean_std([by[(s, e)][key] for s in use], empty=math.nan)
            means.append(m)
            stds.append(sd)
        curves[f"{key}_mean"] = means
        curves[f"{key}_std"] = stds
    out["curves"] = curves
    return out


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


def _train_all(
    config: IndicatorConfig, rows: list[dict[str, Any]], rd: RunDir, dev: torch.device,
    progress: bool,
) -> dict[str, float]:  # fmt: skip
    """Train and measure every missing unit, appending to ``rows`` and ``metrics.jsonl``."""
    units = _units(config)
    done = {(r["width"], r["delta"], r["seed"]) for r in rows if r["epoch"] == config.epochs}
    rows[:] = [r for r in rows if (r["width"], r["delta"], r["seed"]) in done]
    timings: dict[str, float] = {}
    # A training run's cost grows about linearly with D = 3h (every product is over all of θ):
    # the ETA weights each run by its width, and kept runs shorten the work without time.
    bar = Progress(len(units), "indicator", enabled=progress,
                   work_total=sum(w for _, w, _, _ in units))  # fmt: skip
    with num_threads(config.threads):
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
            bar.update(1, work=width,
                       postfix=f"h={width} δ={delta:g} seed={seed}: ratio {new[-1]['ratio']:.1f}")  # fmt: skip
    return timings


def run(
    config: IndicatorConfig,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run the experiment and write the run directory (no figures); returns ``results.json``.

    Args:
        config: the configuration (validated here).
        out: run directory; a run there with the same config keeps its finished training runs.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: show a progress line. profile: the preset's name, recorded in ``config.json``.

    Returns:
        ``results.json``'s content: each width (a string) maps to ``ratio_final`` (mean over the
        live seeds of the final ``Tr(HΣ)/Tr(HΣ̄)``), ``tr_HS_final``, ``tr_HS_iso_final``,
        ``alignment_final`` (each with ``*_std``, the sample std over seeds, and ``*_per_seed``),
        the other final quantities, ``alignment_min`` (over all epochs and seeds) and ``curves``
        (per-epoch mean and std). Also written: ``analysis.json`` (log-log slope of the final
        ratio against D; the δ sweep of Proposition 2), ``config.json``, ``env.json``,
        ``metrics.jsonl``/``.csv`` (one row per width, δ, seed and epoch), ``meta.json``
        (timings) and ``summary.md``. Figures: :func:`sgdnoise.figures.indicator.plot`.

    Raises:
        ValueError: an invalid config or device, or ``out`` holds a run with other settings.
    """
    config = config.validate()
    dev = resolve_device(device)
    rd = RunDir(out)
    rd.refuse_other_config(dataclasses.asdict(config), ignore=("device", "preset"))
    rd.clear_complete()
    t0 = time.perf_counter()
    cfg = {**dataclasses.asdict(config), "device": str(dev), "preset": profile}
    # An earlier run here with the same config (device and label aside) keeps its training runs.
    keep = rd.exists("metrics.jsonl") and rd.config_changes(cfg, ignore=("device", "preset")) == []
    rows = rd.read_jsonl("metrics.jsonl") if keep else []
    rd.write_config(cfg)
    rd.write_env(dev)
    timings = _train_all(config, rows, rd, dev, progress)
    results, analysis = _collect(config, rows)
    rd.write_json("results.json", results)
    rd.write_json("analysis.json", analysis)
    rd.write_csv("metrics.csv", rows)
    meta = {"seconds": time.perf_counter() - t0, "runs_computed": len(timings),
            "runs_total": len(_units(config)), "unit_seconds": timings, "device": str(dev)}  # fmt: skip
    rd.write_json("meta.json", meta)
    rd.write_text("summary.md", summary_markdown(config_identity(cfg), results, analysis, meta))
    rd.mark_complete("indicator", config)
    return results


def _collect(
    config: IndicatorConfig, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    def group(width: int, delta: float, seeds: tuple[int, ...]) -> dict[str, Any]:
        sel = [r for r in rows if (r["width"], r["delta"]) == (width, delta) and r["seed"] in seeds]
        return _aggregate(sel, config.epochs)

    results = {str(w): group(w, config.delta, config.seeds) for w in config.widths}
    dims = [results[str(w)]["dim"] for w in config.widths]
    slope = loglog_slope(dims, [results[str(w)]["ratio_final"] for w in config.widths])
    width = config.delta_sweep_width
    sweep = {f"{d:g}": group(width, d, config.sweep_seeds) for d in config.delta_sweep}
    analysis = {
        "ratio_vs_dim_loglog_slope": slope,
        "dims": dims,
        "delta_sweep_width": config.delta_sweep_width if config.delta_sweep else None,
        "delta_sweep": sweep,
    }
    return results, analysis
