"""The 2-D escape experiment (Zhu et al., ICML 2019, Sec. 5.1; poster Fig. 1), vectorised over runs.

Setting (the released ``2Dim`` code): per-sample loss ``ℓ(w; x) = min{q_s(w − x − (1,1)),
q_f(w − x + (1,1))}`` (sharp minimum near (1, 1) with Hessian eigenvalues 200/20, flat one near
(−1, −1) with Hessian 2I), N = 100 data points drawn anew for every run, start at w₀ = (1, 1),
500 steps of ``w ← w − η∇L(w) + ε`` with η = 0.005 and parameter-level noise ε of trace 0.01 per
step, 100 runs. Success: the final iterate has w₁ < −0.5 and w₂ < −0.5 (flat basin).

Noise structures: every registered one (:func:`sgdnoise.noise_structures`), through its batched
sampler :meth:`~sgdnoise.noise.NoiseModel.batched_factor`: the covariance is recomputed at the
pre-step point every step from the run's centred per-sample gradients (``Σ_1``, divisor N) and
mean Hessian, then rescaled to trace T = 0.01, as in the released code. Once the trace is fixed
some structures coincide (``const`` = ``dynamic``; ``full`` = ``multiplicative``): the default
list runs one dynamics per distinct sampler, in registry order.

All R runs of a dynamics advance together: the 2×2 statistics are batched ``[R, 2, 2]`` tensors
(batched ``eigh``), the update is :func:`sgdnoise.gld_step` on ``[R, 2]`` with gradient-level noise
``n = ε / η`` (so ``η n`` has the covariance above), and the noise is
:func:`sgdnoise.optim.factor_noise`. The batched samplers are tested against the registered
structures (:func:`sgdnoise.noise_model`) on single runs.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import Field

from ..config import Distinct, ExperimentConfig, OneOf, experiment_config
from ..data import toy2d_data
from ..figures.toy import summary_markdown
from ..models import toy2d_sample_loss
from ..models import toy2d_statistics as toy_statistics
from ..noise import BatchedStatistics, NoiseModel, noise_class
from ..optim import dynamics_label, dynamics_names, factor_noise, gld_step
from ..runs import (
    Progress,
    RunDir,
    check_memory,
    resolve_device,
    resolve_dtype,
    wilson_interval,
)

__all__ = [
    "ALL_DYNAMICS",
    "DEFAULT_DYNAMICS",
    "PRESETS",
    "ToyConfig",
    "noise_factor",
    "run",
    "simulate",
    "toy_dynamics",
]


def toy_dynamics() -> tuple[str, ...]:
    """Every dynamics the toy runs: ``gd`` and ``gld_<s>`` for every registered structure ``s``
    (read from the registry at call time; the toy has no mini-batch SGD)."""
    return tuple(d for d in dynamics_names() if d != "sgd")


def default_dynamics() -> tuple[str, ...]:
    """``gd`` and one ``gld_*`` per distinct batched sampler (registry order): structures that
    share their sampler (``dynamic`` = ``const``, ``multiplicative`` = ``full``) run once."""
    seen: set[Any] = set()
    out = ["gd"]
    for name in toy_dynamics()[1:]:
        sampler = noise_class(name[len("gld_") :]).batched_factor.__func__  # type: ignore[attr-defined]
        if sampler not in seen:
            seen.add(sampler)
            out.append(name)
    return tuple(out)


#: The dynamics of poster Fig. 1 plus ``gld_full``, in plotting order (from the registry at import;
#: the config validates against :func:`toy_dynamics` when it is built, so later registrations count).
DEFAULT_DYNAMICS = default_dynamics()
ALL_DYNAMICS = toy_dynamics()


@experiment_config("toy")
class ToyConfig(ExperimentConfig):
    """Configuration of the 2-D experiment (defaults: the released code's settings); every field
    is a flag of ``sgdnoise toy`` and a key of its ``--config`` TOML file."""

    runs: int = Field(
        default=100, ge=1, description="independent runs per dynamics (each with its own data set)"
    )
    steps: int = Field(default=500, ge=1, description="iterations per run")
    lr: float = Field(default=0.005, gt=0, description="step size η")
    noise_trace: float = Field(
        default=0.01, gt=0, description="trace of the parameter-level noise covariance per step"
    )
    num_points: int = Field(default=100, ge=2, description="data points per run (N)")
    start: tuple[float, float] = Field(
        default=(1.0, 1.0), description="initial w (the sharp minimum)"
    )
    threshold: float = Field(
        default=-0.5, description="success if both final coordinates are below it"
    )
    dynamics: Annotated[tuple[Annotated[str, OneOf(toy_dynamics)], ...], Distinct()] = Field(
        default=DEFAULT_DYNAMICS, min_length=1, description="dynamics to run, in plotting order"
    )
    k: int = Field(
        default=2,
        ge=1,
        le=2,
        description="eigenpairs kept by gld_leading (D = 2; the released code: 2)",
    )
    seeds: Annotated[tuple[Annotated[int, Field(ge=0)], ...], Distinct()] = Field(
        default=(0,),
        min_length=1,
        description="master seeds (the data and noise streams derive from each)",
    )
    dtype: Literal["float32", "float64"] = Field(
        default="float64", description="floating-point precision"
    )
    trajectory_run: int = Field(
        default=0, ge=0, description="which run's trajectories are saved for the plot (< runs)"
    )
    trajectory_every: int = Field(
        default=5, ge=1, description="save every k-th iterate of that run (the released plot: 5)"
    )
    curve_every: int = Field(default=10, ge=1, description="record the fraction of runs in the flat basin every k steps")  # fmt: skip

    @pydantic.model_validator(mode="after")
    def _trajectory_in_range(self) -> ToyConfig:
        if self.trajectory_run >= self.runs:
            raise ValueError(
                f"trajectory_run must be an integer in [0, runs) = [0, {self.runs}), got "
                f"{self.trajectory_run}; lower it or raise runs"
            )
        return self


PRESETS: dict[str, ToyConfig] = {
    "smoke": ToyConfig(runs=8, steps=60),
    "quick": ToyConfig(),
    "paper": ToyConfig(),
}


# --------------------------------------------------------------------------------------------
# Batched statistics and noise factors
# --------------------------------------------------------------------------------------------


def _structure(dynamics: str, settings: Any = None) -> tuple[type[NoiseModel], dict[str, Any]]:
    """The structure class of ``gld_<name>`` and its options read from ``settings``."""
    if not dynamics.startswith("gld_") or dynamics not in toy_dynamics():
        raise ValueError(f"unknown toy dynamics {dynamics!r}; valid: {', '.join(toy_dynamics())}")
    cls = noise_class(dynamics[len("gld_") :])
    return cls, cls.resolve_options(cls.options_from(settings))


def noise_factor(
    dynamics: str,
    centered: torch.Tensor,
    hessian: torch.Tensor | None,
    trace: float,
    *,
    k: int = 2,
) -> torch.Tensor | None:
    """Parameter-level noise factor ``L`` ``[R, 2, r]`` with ``L Lᵀ`` of trace ``trace`` per run.

    The structure's :meth:`~sgdnoise.noise.NoiseModel.batched_factor` with the options the toy
    gives it (``k`` for ``leading``).

    Args:
        dynamics: a name from :func:`toy_dynamics` (``"gd"`` returns ``None``).
        centered: centred per-sample gradients ``c_i = g_i − ḡ`` ``[R, N, 2]``.
        hessian: mean Hessian ``[R, 2, 2]`` (needed by the Hessian structures).
        trace: T.
        k: eigenpairs for ``gld_leading``.

    Raises:
        ValueError: an unknown dynamics, or a Hessian structure without ``hessian``.
    """
    if dynamics == "gd":
        return None
    cls, opts = _structure(dynamics, SimpleNamespace(k=k))
    return cls.batched_factor(BatchedStatistics(centered, hessian), trace, opts)


def _noise_seed(seed: int, dynamics: str) -> int:
    """An independent stream per (seed, dynamics), stable when other dynamics are added/removed."""
    return (seed * 1_000_003 + zlib.crc32(dynamics.encode())) % (2**63 - 1)


def simulate(
    dynamics: str,
    X: torch.Tensor,
    config: ToyConfig,
    *,
    generator: torch.Generator,
    record: bool = True,
) -> dict[str, Any]:
    """Run all R runs of one dynamics together from ``config.start``.

    Args:
        dynamics: a name from :func:`toy_dynamics`.
        X: the runs' data ``[R, N, 2]``.
        config: the settings (steps, lr, noise trace, start, threshold, recording periods).
        generator: the noise source.
        record: whether to record the trajectory and the curve.

    Returns:
        ``{"final": [R, 2], "trajectory": [T', 2] (run config.trajectory_run, every
        trajectory_every iterates and the last), "curve": [(step, fraction in the flat basin,
        mean loss)]}``.
    """
    R = X.shape[0]
    cls, opts = _structure(dynamics, config) if dynamics != "gd" else (None, {})
    need_h = cls is not None and cls.batched_needs_hessian
    w = torch.tensor(config.start, dtype=X.dtype, device=X.device).expand(R, 2).clone()
    lr, thr = config.lr, config.threshold
    traj = [w[config.trajectory_run].clone()]
    curve = []

    def note(step: int) -> None:
        flat = ((w[:, 0] < thr) & (w[:, 1] < thr)).to(X.dtype).mean()
        loss = toy2d_sample_loss(w[:, None, :], X).mean()
        curve.append((step, float(flat), float(loss)))

    if record:
        note(0)
    for t in range(config.steps):
        gbar, C, H = toy_statistics(w, X, need_hessian=need_h)
        n = None
        if cls is not None:
            L = cls.batched_factor(BatchedStatistics(C, H), config.noise_trace, opts)
            n = factor_noise(L, generator=generator) / lr
        w = gld_step(w, gbar, lr, n)
        if record and ((t + 1) % config.trajectory_every == 0 or t + 1 == config.steps):
            traj.append(w[config.trajectory_run].clone())
        if record and ((t + 1) % config.curve_every == 0 or t + 1 == config.steps):
            note(t + 1)
    return {"final": w, "trajectory": torch.stack(traj), "curve": curve}


def tr_HS_at_start(dynamics: str, X: torch.Tensor, config: ToyConfig) -> torch.Tensor:
    """``Tr(H Σ)`` per run ``[R]`` at ``config.start`` (Σ = the parameter-level noise covariance)."""
    R = X.shape[0]
    w = torch.tensor(config.start, dtype=X.dtype, device=X.device).expand(R, 2)
    _, C, H = toy_statistics(w, X)
    assert H is not None
    if dynamics == "gd":
        return torch.zeros(R, dtype=X.dtype, device=X.device)
    cls, opts = _structure(dynamics, config)
    L = cls.batched_factor(BatchedStatistics(C, H), config.noise_trace, opts)
    return torch.einsum("rij,rjk,rik->r", H, L, L)  # Tr(H L Lᵀ) = Σ_ijk H_ij L_jk L_ik


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _surface(X0: torch.Tensor, lim: float = 2.75, num: int = 121) -> dict[str, Any]:
    xs = torch.linspace(-lim, lim, num, dtype=torch.float64)
    W = torch.stack(
        torch.meshgrid(xs, xs, indexing="xy"), -1
    )  # [num, num, 2], W[i, j] = (x_j, y_i)
    Z = toy2d_sample_loss(W[:, :, None, :], X0.double().cpu()[None, None]).mean(-1)
    return {
        "x": xs.tolist(),
        "y": xs.tolist(),
        "loss": [[round(v, 6) for v in row] for row in Z.tolist()],
    }


def _run_dynamics(
    name: str, data: list[tuple[int, torch.Tensor]], config: ToyConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[list[float]]]:
    """One dynamics over every seed's runs: its results entry, csv rows, curve rows, trajectory."""
    finals, trhs, curves, traj = [], [], [], None
    for seed, X in data:
        out = simulate(
            name, X, config, generator=torch.Generator().manual_seed(_noise_seed(seed, name))
        )
        finals.append(out["final"])
        trhs.append(tr_HS_at_start(name, X, config).double())
        curves.append(out["curve"])
        traj = out["trajectory"].double().cpu().tolist() if traj is None else traj
    final = torch.cat(finals)
    X_all = torch.cat([X for _, X in data])
    runs = final.shape[0]
    ok = (final[:, 0] < config.threshold) & (final[:, 1] < config.threshold)
    k = int(ok.sum())
    lo, hi = wilson_interval(k, runs)
    tr = torch.cat(trhs)
    final_loss = toy2d_sample_loss(final[:, None, :], X_all).mean(1)
    entry = {
        "label": dynamics_label(name),
        "success_rate": k / runs,
        "successes": k,
        "runs": runs,
        "ci_low": lo,
        "ci_high": hi,
        "tr_HS": float(tr.mean()),
        "tr_HS_std": float(tr.std()) if runs > 1 else 0.0,
        "noise_trace": 0.0 if name == "gd" else config.noise_trace,
        "final_loss_mean": float(final_loss.double().mean()),
    }
    rows = [
        {"dynamics": name, "run": r, "w1": float(final[r, 0]), "w2": float(final[r, 1]),
         "success": int(ok[r]), "final_loss": float(final_loss[r])}
        for r in range(runs)
    ]  # fmt: skip
    metrics = [
        {"dynamics": name, "step": step, "frac_flat": frac, "mean_loss": loss}
        for curve in curves
        for step, frac, loss in curve
    ]
    assert traj is not None
    return entry, rows, metrics, traj


def run(
    config: ToyConfig,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run the experiment and write the run directory; returns ``results.json``'s content.

    Files: ``config.json``, ``env.json``, ``results.json`` (dynamics → label, success_rate,
    successes, runs, ci_low, ci_high (95% Wilson), tr_HS (mean over runs at the start),
    tr_HS_std, noise_trace, final_loss_mean), ``runs.csv`` (final iterate of every run),
    ``metrics.jsonl`` (fraction of runs in the flat basin and mean loss every ``curve_every``
    steps), ``trajectories.json``, ``surface.json`` (what the figures draw besides the results),
    ``meta.json`` (timing) and ``summary.md``. Draws nothing: :func:`sgdnoise.figures.toy.plot`.

    Args:
        config: a :class:`ToyConfig`. With a ``seeds`` tuple, every seed's runs (its own data and
            noise) are pooled; ``seeds=(s,)`` equals ``seed=s``.
        out: the run directory.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        progress: show a progress line on stderr.
        profile: the preset's name, recorded in ``config.json``.

    Raises:
        ValueError: a bad config, or ``out`` holds a run with other settings (the message says
            which). MemoryError: the runs do not fit on the device.
    """
    config = config.validate()
    seeds = tuple(config.seeds)
    dev = resolve_device(device)
    dtype = resolve_dtype(config.dtype)
    # The [runs, num_points, 2] data and about a dozen temporaries of that size per step.
    check_memory(
        12 * config.runs * config.num_points * 2 * torch.finfo(dtype).bits // 8,
        dev,
        what=f"{config.runs} runs × {config.num_points} points",
        fix="lower --runs (the paper uses 100) or num_points",
    )
    rd = RunDir(out)
    rd.refuse_other_config(dataclasses.asdict(config), ignore=("device", "preset"))
    rd.clear_complete()
    t0 = time.perf_counter()
    rd.write_config({**dataclasses.asdict(config), "device": str(dev), "preset": profile})
    rd.write_env(dev)
    data = [
        (s, toy2d_data(config.runs, config.num_points, generator=torch.Generator().manual_seed(s),
                       dtype=dtype, device=dev))
        for s in seeds
    ]  # fmt: skip
    bar = Progress(len(config.dynamics), "toy", enabled=progress)
    results: dict[str, Any] = {}
    rows: list[Mapping[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    trajectories: dict[str, Any] = {}
    for name in config.dynamics:
        results[name], r, m, trajectories[name] = _run_dynamics(name, data, config)
        rows += r
        metrics += m
        bar.update(1, postfix=f"{name}: {results[name]['successes']}/{results[name]['runs']}")
    elapsed = time.perf_counter() - t0
    rd.write_json("results.json", results)
    rd.write_csv("runs.csv", rows)
    rd.write_jsonl("metrics.jsonl", metrics)
    rd.write_json(
        "trajectories.json",
        {"run": config.trajectory_run, "every": config.trajectory_every, "paths": trajectories},
    )
    rd.write_json("surface.json", _surface(data[0][1][config.trajectory_run]))
    rd.write_json("meta.json", {"simulation_seconds": elapsed, "device": str(dev)})
    rd.write_text("summary.md", summary_markdown(config.to_dict(), results, elapsed))
    rd.mark_complete("toy", config)
    return results
