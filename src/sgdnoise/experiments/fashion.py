"""FashionMNIST with corrupted labels (poster Fig. 2 and Fig. 4 right; Zhu et al., ICML 2019, Sec. 5.3).

Protocol (per seed):

1. **GD phase.** The paper's CNN (11,330 parameters, truncated-normal init with std 0.02, seeded
   by the run's seed) is trained by full-batch GD with lr 0.1 for 3,000 iterations on 1,200
   training images whose labels 1000–1199 are uniformly random (drawn from ``data_seed``, the same
   for every seed). The end point is θ*_GD; it is computed once per seed and reused by every
   dynamics (and by later invocations on the same run directory).
2. **After the switch**, every dynamics starts from θ*_GD with lr **0.07** — GD included (the
   released ``gd.py`` keeps 0.1; we use 0.07 for every dynamics so that only the noise differs,
   a choice of ours): ``gd``, ``sgd`` (mini-batch 20, with replacement), and GLD with the
   structures ``const`` (gradient-level σ = 1e-3), ``dynamic``, ``diag``, ``leading`` (k = 20, not
   rescaled, as the released code), ``hessian`` (k = 20), ``hessian_top1``, ``full`` (Σ exactly)
   and ``multiplicative``. Σ = Σ_20 is the covariance of a size-20 mini-batch gradient (with
   replacement). Covariances are refreshed every step for dynamic/diag/hessian_top1/full and every
   10 steps for leading/hessian (configurable); a fresh noise sample is drawn at every step.

Measurements: test accuracy and loss on the test set, training accuracy separately on the clean
and the corrupted samples (against the random labels they are trained on, and against the true
labels), the expected sharpness ``E_ν[L(θ+ν)] − L(θ)`` (signed, the poster's) and
``E_ν|L(θ+ν) − L(θ)|`` (absolute, the released code's) with ν ~ N(0, 0.01² I), and the escape
indicator Tr(HΣ_20) against Tr(HΣ̄) along the GD phase and along SGD after the switch.

Profiles: ``smoke`` (seconds, for tests), ``quick`` (every dynamics, 1,000 iterations after the
switch, one seed, a 2-core CPU), ``paper`` (15,000 iterations after the switch, 3 seeds, a GPU).
See :data:`PRESETS` for what each measures and how often.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Field

from .._stats import curve_over_seeds, stat
from .._utils import is_writer
from ..config import Distinct, ExperimentConfig, OneOf, configure, experiment_config
from ..engine import resolve_engine
from ..figures.fashion import summary
from ..optim import default_refresh, dynamics_label, dynamics_names
from ..problem import local_range
from ..runs import RunDir, data_key, notice, resolve_device, resolve_dtype
from .fashion_batched import run_batched
from .fashion_run import NUM_TEST, PhaseBar, load_phase_data, run_loop

__all__ = [
    "ALL_DYNAMICS",
    "DEFAULT_REFRESH",
    "PRESETS",
    "FashionConfig",
    "config_from",
    "run",
    "validate",
]

# Every name comes from the noise-structure registry (sgdnoise.optim). The config validates
# against dynamics_names() when it is built, so structures registered after this import count.
#: Every dynamics compared after the switch, in the order they are run and plotted.
ALL_DYNAMICS: tuple[str, ...] = dynamics_names()

#: Covariance refresh periods of the released code (steps); ``gd``/``sgd`` have nothing to refresh.
DEFAULT_REFRESH: dict[str, int] = {
    d: default_refresh(d) for d in ALL_DYNAMICS if default_refresh(d)
}


def _refreshed() -> tuple[str, ...]:
    """The dynamics with a covariance to refresh (the keys of ``refresh_every``)."""
    return tuple(n for n in dynamics_names() if default_refresh(n) > 0)


_Names = Annotated[tuple[Annotated[str, OneOf(dynamics_names)], ...], Distinct()]
_Every = Annotated[int, Field(ge=0, description="0 = only at the end of the phase")]
_Budget = Annotated[int, Field(ge=1)] | None


@experiment_config("fashion")
class FashionConfig(ExperimentConfig):
    """Every setting of the FashionMNIST experiment; every field is a flag of ``sgdnoise
    fashion`` and a key of its ``--config`` TOML file (``profile`` is the ``--profile`` option).

    The Lanczos budgets ``eigen_max_matvecs``/``top1_max_matvecs`` (Hessian-vector products per
    refresh of GLD Hessian / GLD 1st eigvec(H); none: run to convergence) use the best Ritz pairs
    found without a warning; every refresh warm-starts from the previous one, so the estimate keeps
    improving along the trajectory (a continued subspace iteration).
    """

    profile: str = Field(
        default="quick", description="name of the preset this config came from (a label)"
    )
    dynamics: _Names = Field(
        default=ALL_DYNAMICS, min_length=1, description="dynamics run after the switch, in order"
    )
    seeds: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Distinct()] = Field(
        default=(0,),
        min_length=1,
        description="model-initialisation/noise seeds (tables: mean ± std over them)",
    )
    data_seed: int = Field(
        default=0, ge=0, description="seed of the random labels (one corrupted set for every seed)"
    )
    n_train: int = Field(
        default=1200,
        ge=2,
        le=60000,
        description="training images (the first n_train; the paper: 1200)",
    )
    n_clean: int = Field(
        default=1000,
        ge=0,
        description="training images that keep their labels (<= n_train; the paper: 1000)",
    )
    n_test: int | None = Field(
        default=None,
        ge=1,
        le=NUM_TEST,
        description="test images used (the first n_test; none: all 10,000)",
    )
    dtype: Literal["float32", "float64"] = Field(
        default="float32", description="floating-point precision"
    )
    gd_lr: float = Field(default=0.1, gt=0, description="step size of the GD phase (full batch)")
    gd_iterations: int = Field(
        default=3000, ge=1, description="iterations of the GD phase before the switch"
    )
    lr: float = Field(
        default=0.07, gt=0, description="step size of every dynamics after the switch"
    )
    iterations: int = Field(default=1000, ge=1, description="iterations after the switch")
    batch_size: int = Field(
        default=20,
        ge=1,
        description="SGD's mini-batch b, and the b of Σ_b the GLD structures imitate",
    )
    const_sigma: float = Field(
        default=1e-3, ge=0, description="gradient-level std of GLD const (parameter std = lr · σ)"
    )
    k: int = Field(default=20, ge=1, description="eigenpairs of GLD leading and GLD Hessian")
    leading_match_trace: bool = Field(
        default=False, description="rescale GLD leading to Tr Σ_b (the released code does not)"
    )
    refresh_every: Mapping[Annotated[str, OneOf(_refreshed)], Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: dict(DEFAULT_REFRESH),
        description="covariance refresh period (steps) per GLD dynamics",
    )
    eigen_max_matvecs: _Budget = Field(
        default=None, description="Lanczos budget per refresh of GLD Hessian (none: converge)"
    )
    top1_max_matvecs: _Budget = Field(
        default=None, description="Lanczos budget per refresh of GLD 1st eigvec(H) (none: converge)"
    )
    lanczos_tol: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Lanczos relative residual tolerance (none: 1e-3 in float32)",
    )
    gd_eval_every: _Every = Field(
        default=100, description="steps between test/train evaluations in the GD phase"
    )
    eval_every: _Every = Field(
        default=50, description="steps between test/train evaluations after the switch"
    )
    gd_sharpness_every: _Every = Field(
        default=1000,
        description="steps between expected-sharpness measurements, GD phase (0: at the end)",
    )
    sharpness_every: _Every = Field(
        default=1000,
        description="steps between expected-sharpness measurements after the switch (0: at the end)",
    )
    sharpness_sigma: float = Field(
        default=0.01, gt=0, description="perturbation std of the expected sharpness"
    )
    sharpness_draws: int = Field(
        default=1000,
        ge=2,
        description="perturbations per expected-sharpness measurement (the poster: 1000)",
    )
    gd_indicator_every: _Every = Field(
        default=1000,
        description="steps between escape-indicator measurements, GD phase (0: at the end)",
    )
    indicator_every: _Every = Field(
        default=500,
        description="steps between indicator measurements after the switch (0: at the end)",
    )
    indicator_dynamics: _Names = Field(
        default=("sgd",),
        description="dynamics along which the indicator is measured after the switch",
    )
    indicator_samples: int | None = Field(
        default=None,
        ge=2,
        description="examples sampled for Tr(HΣ) (an unbiased estimate with a standard error); none: exact",
    )
    indicator_trace_matvecs: int = Field(
        default=99,
        ge=4,
        description="Hutch++ products for Tr(H) (D > 2048 here, so it is estimated)",
    )
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints (per dynamics, rounded up to a multiple of its refresh period)")  # fmt: skip
    engine: Literal["auto", "loop", "batched"] = Field(default="auto", description="how the phases run: loop = one model per phase, one after the other; batched = the phases of a stage (GD phases of every seed, then every dynamics of every seed) stepped together in one batched engine (same numbers up to rounding, same files); auto = batched on CUDA, loop on the CPU (where the engine is slower)")  # fmt: skip
    memory_budget: str = Field(default="4G", pattern=r"^\d+(\.\d+)?[KMGT]?$", description="memory one pass may use, e.g. 4G; fixed (not a share of the free memory) so that repeated and resumed runs chunk alike and give bit-identical numbers; lower it on a small machine")  # fmt: skip

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> FashionConfig:
        for name in ("n_clean", "batch_size", "indicator_samples"):
            v = getattr(self, name)
            if v is not None and v > self.n_train:
                raise ValueError(f"{name} must be <= n_train = {self.n_train}, got {v}")
        return self


#: Named presets.
#:
#: * ``paper``: the protocol in full — 3 seeds, 15,000 iterations after the switch, the released
#:   refresh periods, Lanczos run to convergence, 1,000 sharpness draws every 1,000 iterations,
#:   the exact Tr(HΣ) (N = 1,200 Hessian products; Tr(H) by Hutch++ with 300 products, D > 2048).
#: * ``quick`` (one 2-core CPU): the same protocol for one seed and 1,000 iterations after the
#:   switch, with the measurements thinned — evaluations every 100 steps (250 in the GD phase;
#:   one test evaluation costs about 10 GD steps), expected sharpness (100 draws, each a forward
#:   pass over the training set) every 1,000 GD iterations and every 150 iterations after the
#:   switch (7 points per dynamics: Fig. 2 right is a curve; measured on the real data, 100 draws
#:   give a standard error of 0.0005–0.0012 after the switch, while GD and SGD differ by 0.014
#:   after 150–300 iterations and the poster's aligned dynamics end 0.008–0.013 below GD: 6–10
#:   combined standard errors, so more draws would not change a verdict), the indicator sampled (32 examples,
#:   Tr(H) from 30 Hutch++ products) at GD iterations 0/1000/2000/3000 and SGD iterations
#:   500/1000 — and the Hessian structures on a Lanczos budget: GLD Hessian refreshes every 10
#:   steps with 28 Hessian products (the 20 warm-start vectors + one block of 8), GLD 1st eigvec(H)
#:   refreshes every 10 steps (not 1) with 6 products. Both warm-start from the previous refresh.
#: * ``smoke`` (tests, seconds): 60 training / 200 test images, 10 + 10 iterations, k = 4.
PRESETS: dict[str, FashionConfig] = {
    "smoke": FashionConfig(
        profile="smoke",
        n_train=60,
        n_clean=50,
        n_test=200,
        gd_iterations=10,
        iterations=10,
        k=4,
        refresh_every={
            **DEFAULT_REFRESH,
            "gld_leading": 5,
            "gld_hessian": 5,
            "gld_hessian_top1": 5,
        },
        eigen_max_matvecs=8,
        top1_max_matvecs=3,
        gd_eval_every=5,
        eval_every=5,
        gd_sharpness_every=0,
        sharpness_every=0,
        sharpness_draws=8,
        gd_indicator_every=0,
        indicator_every=0,
        indicator_samples=8,
        indicator_trace_matvecs=6,
        checkpoint_every=5,
    ),
    "quick": FashionConfig(
        profile="quick",
        gd_eval_every=250,
        eval_every=100,
        gd_sharpness_every=1000,
        sharpness_every=150,
        sharpness_draws=100,
        gd_indicator_every=1000,
        indicator_every=500,
        indicator_samples=32,
        indicator_trace_matvecs=30,
        refresh_every={**DEFAULT_REFRESH, "gld_hessian_top1": 10},
        eigen_max_matvecs=28,
        top1_max_matvecs=6,
        checkpoint_every=100,
    ),
    "paper": FashionConfig(
        profile="paper",
        seeds=(0, 1, 2),
        iterations=15000,
        gd_eval_every=50,
        eval_every=50,
        gd_sharpness_every=1000,
        sharpness_every=1000,
        sharpness_draws=1000,
        gd_indicator_every=250,
        indicator_every=1000,
        indicator_samples=None,
        indicator_trace_matvecs=300,
        checkpoint_every=500,
    ),
}

# Fields whose value changes the numbers of a phase: a run directory refuses to resume with others.
_SELECTION_FIELDS = ("profile", "dynamics", "seeds")


def validate(config: FashionConfig) -> None:
    """Check every value before any work starts (:meth:`ExperimentConfig.validate`).

    Raises:
        ConfigError: one line saying which value is wrong and how to fix it.
    """
    config.validate()


def config_from(
    profile: str = "quick", toml: Mapping[str, Any] | None = None, **overrides: Any
) -> FashionConfig:
    """A preset, then a TOML table, then explicit keyword overrides (``None`` = not given)."""
    return configure(PRESETS, profile, toml, overrides, what="fashion")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _engine(config: FashionConfig, dev: torch.device) -> str:
    """``"loop"`` or ``"batched"`` for ``config.engine`` on ``dev``, said once on stderr.

    Raises:
        ValueError: ``engine="batched"`` under torchrun (the engine does not reduce over ranks).
    """
    engine = resolve_engine(config.engine, dev)
    if engine == "batched" and local_range(config.n_train) != (0, config.n_train):
        if config.engine == "batched":
            raise ValueError(
                "engine='batched' does not run sharded under torchrun (its passes do not reduce "
                "over ranks); use --engine loop (or auto) with torchrun"
            )
        engine = "loop"
    if is_writer():
        notice(f"fashion: {engine} engine (engine={config.engine!r}, device {dev})")
    return engine


def run(
    config: FashionConfig,
    out: str | Path,
    *,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    profile: str | None = None,
    data_dir: str | Path | None = None,
    _stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment into ``out``; returns the content of ``results.json``.

    Finished phases are loaded, unfinished ones resume from their last checkpoint (a damaged
    checkpoint is moved aside and its phase recomputed). Writes ``config.json``, ``data.json``
    (the input files' names, sizes and SHA-256: resuming on other files is refused), ``env.json``,
    per-phase ``metrics.jsonl``, ``metrics.csv``, ``results.json``, ``summary.md``, the figures
    and, last, ``complete.json``.

    Args:
        config: a validated :class:`FashionConfig` (see :data:`PRESETS`, :func:`config_from`).
        out: the run directory.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: show a progress bar with ETA on stderr.
        profile: the preset's name (informational: ``config.profile`` is what is recorded).
        data_dir: folder with the four FashionMNIST IDX files (default: the usual places).

    Returns:
        ``results.json``'s content; ``{}`` when ``_stop_after`` (a testing hook) interrupted it.

    Raises:
        DataNotFoundError: FashionMNIST is not available (the message says how to get it).
        ValueError: a bad config, a run directory holding a run with other settings or other
            data, or data files with fewer images than ``n_train``/``n_test`` ask for.
    """
    validate(config)
    dev = resolve_device(device)
    ident, pdata, source = load_phase_data(config, data_dir, resolve_dtype(config.dtype), dev)
    rd = RunDir(out)
    rd.refuse_other_config(config.to_dict(), ignore=_SELECTION_FIELDS)
    rd.refuse_other_data(ident, what="FashionMNIST")
    rd.clear_complete()
    rd.write_config(config.to_dict())
    rd.write_json("data.json", ident)
    rd.write_env(dev)
    bar = PhaseBar(config, progress)
    engine = _engine(config, dev)
    if engine == "batched":
        phases = run_batched(config, pdata, rd.path, bar, _stop_after)
    else:
        phases = run_loop(config, pdata, rd.path, bar, _stop_after)
    if phases is None:
        return {}
    results = build_results(
        config, phases, source=source, device=str(dev), n_test=pdata.y_test.shape[0],
        data_files=ident["files"], engine=engine,
    )  # fmt: skip
    rd.write_json("results.json", results)
    rd.write_csv("metrics.csv", _flat_rows(phases))
    rd.write_text("summary.md", summary(results))
    rd.mark_complete("fashion", config, data=data_key(ident))
    return results


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


_CURVE_KEYS = (
    "test_acc",
    "test_loss",
    "train_loss",
    "train_acc_clean",
    "train_acc_corrupted",
    "train_acc_corrupted_true",
    "sharpness_signed",
    "sharpness_abs",
    "tr_HS",
    "tr_HS_iso",
    "indicator_ratio",
)
#: The end-of-phase values of the GD phase in ``results.json`` (in this order).
_GD_KEYS = (
    "test_acc",
    "test_loss",
    "train_acc_clean",
    "train_acc_corrupted",
    "train_acc_corrupted_true",
    "train_loss",
    "sharpness_signed",
    "sharpness_abs",
    "tr_HS",
    "tr_HS_iso",
    "indicator_ratio",
)
#: ``results.json`` key → metrics key of the last value after the switch (in this order).
_FINAL_KEYS = {
    "final_test_acc": "test_acc",
    "final_test_loss": "test_loss",
    "final_train_loss": "train_loss",
    "final_train_acc_clean": "train_acc_clean",
    "final_train_acc_corrupted": "train_acc_corrupted",
    "final_train_acc_corrupted_true": "train_acc_corrupted_true",
    "sharpness_signed": "sharpness_signed",
    "sharpness_abs": "sharpness_abs",
}


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(rows):
        if r.get(key) is not None:
            return float(r[key])
    return None


def _curves(rows_per_seed: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Every curve measured in at least one row."""
    return {
        k: curve_over_seeds(rows_per_seed, k)
        for k in _CURVE_KEYS
        if any(r.get(k) is not None for rows in rows_per_seed for r in rows)
    }


def _meta(config: FashionConfig, seeds: list[int], **extra: Any) -> dict[str, Any]:
    """``results.json``'s ``meta``: the protocol, and what each reported quantity means."""
    return {
        "experiment": "fashion",
        "profile": config.profile,
        "seeds": seeds,
        "dynamics": list(config.dynamics),
        "device": extra["device"],
        "data_source": extra["source"],
        "data_files": dict(extra["data_files"] or {}),
        "switch_iteration": config.gd_iterations,
        "gd_lr": config.gd_lr,
        "lr_after_switch": config.lr,
        "batch_size": config.batch_size,
        "refresh_every": {
            d: int(config.refresh_every.get(d, 1)) for d in config.dynamics if d.startswith("gld_")
        },
        "n_train": config.n_train,
        "n_clean": config.n_clean,
        "n_test": extra["n_test"],
        "indicator_dynamics": [d for d in config.indicator_dynamics if d in config.dynamics],
        "sharpness": {"sigma": config.sharpness_sigma, "draws": config.sharpness_draws},
        "indicator": {
            "batch_size": config.batch_size,
            "exact_tr_HS": config.indicator_samples is None,
            "samples": config.indicator_samples,
            "tr_H_hutchpp_matvecs": config.indicator_trace_matvecs,
        },
        "std": "sample std over seeds (ddof=1); null with one seed",
        "definitions": {
            "final_*": "at the last iteration after the switch",
            "max_test_acc": "largest test accuracy among the evaluations after the switch "
            "(t >= 1; the curves start at t = 0 = θ*_GD)",
            "sharpness_*": "expected sharpness at the last iteration (signed: "
            "E[L(θ+ν)] − L(θ); abs: E|L(θ+ν) − L(θ)|; ν ~ N(0, σ² I), training loss)",
            "train_acc_corrupted": "accuracy on the corrupted samples w.r.t. their random "
            "(training) labels; *_true: w.r.t. their true labels",
        },
    }


def _dynamics_entry(
    config: FashionConfig,
    dyn: str,
    phases: Mapping[int, Mapping[str, Mapping[str, Any]]],
    gd_rows: list[list[dict[str, Any]]],
) -> dict[str, Any]:
    """One dynamics' entry: final values and curves (mean ± std over seeds)."""
    seeds = list(phases)
    rows_ps = [list(phases[s][dyn]["rows"]) for s in seeds]
    # Curves start at θ*_GD: the last GD-phase measurement is t = 0 of every dynamics.
    start = [[dict(r, t=0) for r in rows if r["t"] == config.gd_iterations] for rows in gd_rows]
    entry: dict[str, Any] = {"label": dynamics_label(dyn)}
    for out_key, key in _FINAL_KEYS.items():
        entry[out_key] = stat([_last(rows, key) for rows in rows_ps])
        if out_key == "final_test_acc":
            best = [
                max((r["test_acc"] for r in rows if r.get("test_acc") is not None), default=None)
                for rows in rows_ps
            ]
            entry["max_test_acc"] = stat(best)
    wall = [phases[s][dyn].get("wall_s") for s in seeds]
    entry["wall_s"] = stat(wall)
    entry["seconds_per_step"] = stat([(w or math.nan) / config.iterations for w in wall])
    entry["curves"] = _curves([st + rows for st, rows in zip(start, rows_ps, strict=True)])
    return entry


def build_results(
    config: FashionConfig,
    phases: Mapping[int, Mapping[str, Mapping[str, Any]]],
    *,
    source: str = "",
    device: str = "",
    n_test: int | None = None,
    data_files: Mapping[str, Any] | None = None,
    engine: str = "loop",
) -> dict[str, Any]:
    """``results.json``: ``meta``, ``gd_phase`` and, per dynamics, the mean ± std over seeds and
    the curves (see ``meta["definitions"]``)."""
    seeds = list(phases)
    gd_rows = [list(phases[s]["gd_phase"]["rows"]) for s in seeds]
    n = n_test if n_test is not None else (config.n_test or NUM_TEST)
    meta = _meta(config, seeds, device=device, source=source, data_files=data_files, n_test=n)
    meta["engine"] = engine
    gd_phase: dict[str, Any] = {k: stat([_last(rows, k) for rows in gd_rows]) for k in _GD_KEYS}
    gd_phase["wall_s"] = stat([phases[s]["gd_phase"].get("wall_s") for s in seeds])
    gd_phase["curves"] = _curves(gd_rows)
    results: dict[str, Any] = {"meta": meta, "gd_phase": gd_phase}
    for dyn in config.dynamics:
        results[dyn] = _dynamics_entry(config, dyn, phases, gd_rows)
    return results


def _flat_rows(phases: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> list[Mapping[str, Any]]:
    keys = ["seed", "phase", "t", "iteration", *_CURVE_KEYS]
    out: list[Mapping[str, Any]] = []
    for seed, per in phases.items():
        for name, res in per.items():
            for r in res["rows"]:
                out.append(
                    {k: (seed if k == "seed" else name if k == "phase" else r.get(k)) for k in keys}
                )
    return out
