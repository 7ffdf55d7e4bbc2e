"""The checkpointed training loop of the FashionMNIST experiment (one *phase* at a time).

A phase is the GD phase of one seed (full-batch GD from initialisation, giving θ*_GD) or one
dynamics run after the switch (from θ*_GD). Each phase lives in its own folder::

    <run>/seed_<s>/<phase>/checkpoint.pt   θ_t, optimizer state (generator state and the
                                           eigen solvers' warm start included), rows up to t
    <run>/seed_<s>/<phase>/metrics.jsonl   the rows so far (for people; rewritten atomically)
    <run>/seed_<s>/<phase>/final.pt        θ_T and every row — written once, when the phase ends

Every file is written atomically (temporary file + rename), so a run killed at any moment (even
``kill -9``) leaves either the previous or the new version of each file. Restarting loads the
last checkpoint and continues; because every random number comes either from the optimizer's
generator (saved in the checkpoint) or from a generator seeded by (seed, phase, iteration, use),
a resumed run on the CPU reproduces an uninterrupted one bit for bit.

Checkpoints are taken only at iterations that are multiples of every refresh period, so that
GLD's refresh after a restart (it always rebuilds the covariance after ``load_state_dict``) falls
on a step where the uninterrupted run refreshes anyway; the optimizer state carries the Lanczos
warm start of the Hessian structures, so that refresh starts where the uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..data import corrupted_fashion_mnist, fashion_mnist_identity
from ..engine import Member
from ..measures import escape_indicator, expected_sharpness
from ..models import FashionCNN
from ..noise import noise_class
from ..optim import default_refresh, dynamics_label
from ..phases import StagePhase, load_final, run_phase
from ..problem import Problem, local_range
from ..results import ExpectedSharpness
from ..runs import Progress

if TYPE_CHECKING:
    from .fashion import FashionConfig

__all__ = [
    "NUM_TEST",
    "PhaseBar",
    "PhaseSpec",
    "derive_seed",
    "evaluate_accuracy",
    "load_final",
    "load_phase_data",
    "member_of",
    "phase_cost",
    "phase_spec",
    "run_loop",
]

#: Images in the FashionMNIST test file.
NUM_TEST = 10000


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (``derive_seed(seed, "sgd", "noise")``).

    Independent of the order dynamics are run in and of Python's hash randomisation, so each
    (seed, phase, use) has its own stream and adding a dynamics changes no other numbers.
    """
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 2500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(correct [n] bool, loss [n])`` of a classifier, in chunks (no gradients)."""
    correct, losses = [], []
    for start in range(0, x.shape[0], chunk):
        out = model(x[start : start + chunk])
        yy = y[start : start + chunk]
        correct.append(out.argmax(1) == yy)
        losses.append(F.cross_entropy(out, yy, reduction="none"))
    return torch.cat(correct), torch.cat(losses)


@dataclass
class PhaseData:
    """Tensors a phase measures on (all on the run's device)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    corrupted: torch.Tensor  # bool [N]
    y_train_original: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class PhaseSpec:
    """What one phase runs and measures.

    Attributes:
        seed: the run's seed. name: ``"gd_phase"`` or a dynamics name. num_steps: T.
        iteration_offset: global iteration of t = 0 (0 for the GD phase, the GD length after).
        lr, batch_size, refresh_every, options: the optimizer (see :func:`sgdnoise.make_optimizer`).
        dynamics: the dynamics name given to :func:`sgdnoise.make_optimizer` (``"gd"`` for the GD
            phase).
        eval_every, sharpness_every, indicator_every: measurement periods in steps (< 0: never,
            0: only at the last step; otherwise every multiple and the last step). The last step
            is always evaluated. ``measure_start`` adds t = 0 to every (positive) schedule.
        sharpness_sigma, sharpness_draws, indicator_samples, indicator_trace_matvecs: see
            :class:`~sgdnoise.experiments.fashion.FashionConfig`.
        checkpoint_every: steps between checkpoints (a multiple of ``refresh_every``, so that a
            resumed run restarts on a refresh step and reproduces the uninterrupted one).
    """

    seed: int
    name: str
    dynamics: str
    num_steps: int
    iteration_offset: int
    lr: float
    batch_size: int
    refresh_every: int
    options: dict[str, Any]
    eval_every: int
    sharpness_every: int
    indicator_every: int
    measure_start: bool
    sharpness_sigma: float
    sharpness_draws: int
    indicator_samples: int | None
    indicator_trace_matvecs: int
    checkpoint_every: int


def _due(t: int, every: int, spec: PhaseSpec) -> bool:
    """Whether a measurement with period ``every`` is due at t (< 0: never; 0: only at the end)."""
    if every < 0:
        return False
    if t == spec.num_steps:
        return True
    if every == 0:
        return False
    if t == 0:
        return spec.measure_start
    return t % every == 0


def _due_kinds(spec: PhaseSpec, t: int) -> tuple[bool, bool, bool]:
    """Whether an evaluation, an expected sharpness and an indicator are due at t."""
    do_eval = t == spec.num_steps or _due(t, spec.eval_every, spec)
    return do_eval, _due(t, spec.sharpness_every, spec), _due(t, spec.indicator_every, spec)


def _eval_fields(
    test: tuple[torch.Tensor, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    bad: torch.Tensor,
    ok_true: torch.Tensor | None,
) -> dict[str, Any]:
    """Test/train accuracy and loss from per-sample ``(correct, loss)``; ``ok_true``: whether the
    corrupted samples are classified as their *true* labels (forgetting the random labels shows
    up as this rising while ``train_acc_corrupted`` falls)."""
    (ok, loss), (ok_tr, loss_tr) = test, train
    any_bad = bool(bad.any())
    return {
        "test_acc": float(ok.double().mean()),
        "test_loss": float(loss.double().mean()),
        "train_loss": float(loss_tr.double().mean()),
        "train_acc": float(ok_tr.double().mean()),
        "train_acc_clean": float(ok_tr[~bad].double().mean()) if bool((~bad).any()) else None,
        "train_acc_corrupted": float(ok_tr[bad].double().mean()) if any_bad else None,
        **(
            {"train_acc_corrupted_true": float(ok_true.double().mean())}
            if ok_true is not None
            else {}
        ),
    }


def _sharpness_fields(es: ExpectedSharpness) -> dict[str, Any]:
    return {"sharpness_signed": es.signed, "sharpness_signed_stderr": es.signed_stderr,
            "sharpness_abs": es.absolute, "sharpness_abs_stderr": es.absolute_stderr}  # fmt: skip


def _indicator_fields(problem: Problem, spec: PhaseSpec, t: int) -> dict[str, Any]:
    """The escape indicator at the problem's θ (its own generator per (seed, phase, t))."""
    ind = escape_indicator(
        problem,
        spec.batch_size,
        num_samples=spec.indicator_samples,
        generator=_generator(spec.seed, spec.name, t, "indicator"),
        trace_matvecs=spec.indicator_trace_matvecs,
    )
    return {
        "tr_HS": ind.tr_HS,
        "tr_HS_stderr": ind.stderr,
        "tr_HS_iso": ind.tr_HS_iso,
        # Tr(HΣ̄) = Tr(H) Tr(Σ)/D: its error comes from Tr(H) only (Tr Σ is exact).
        "tr_HS_iso_stderr": ind.tr_H_stderr * ind.tr_S / ind.dim,
        "indicator_ratio": ind.ratio,
        "tr_H": ind.tr_H,
        "tr_S": ind.tr_S,
        "indicator_exact": ind.exact and ind.tr_H_exact,
    }


def measure(problem: Problem, data: PhaseData, spec: PhaseSpec, t: int) -> dict[str, Any] | None:
    """The metrics due at θ_t (``None`` when nothing is due)."""
    do_eval, do_sharp, do_ind = _due_kinds(spec, t)
    if not (do_eval or do_sharp or do_ind):
        return None
    row: dict[str, Any] = {"t": t, "iteration": spec.iteration_offset + t}
    model, bad = problem.model, data.corrupted
    if do_eval:
        ok_true = None
        if bool(bad.any()):
            with torch.no_grad():
                ok_true = model(data.x_train[bad]).argmax(1) == data.y_train_original[bad]
        row.update(_eval_fields(evaluate_accuracy(model, data.x_test, data.y_test),
                                evaluate_accuracy(model, data.x_train, data.y_train),
                                bad, ok_true))  # fmt: skip
    if do_sharp:
        gen = _generator(spec.seed, spec.name, t, "sharpness")
        es = expected_sharpness(problem, spec.sharpness_sigma, spec.sharpness_draws, generator=gen)
        row.update(_sharpness_fields(es))
    if do_ind:
        row.update(_indicator_fields(problem, spec, t))
    return row


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def member_of(spec: PhaseSpec) -> Member:
    """The engine member running ``spec``, with the random stream the loop's optimizer gets."""
    gen = _generator(spec.seed, spec.name, "dynamics")
    return Member(spec.dynamics, spec.lr, generator=gen, batch_size=spec.batch_size,
                  refresh_every=spec.refresh_every, options=dict(spec.options))  # fmt: skip


def _measure_at(problem: Problem, t: int, *, data: PhaseData, spec: PhaseSpec) -> Any:
    return measure(problem, data, spec, t)


def _run_seed(
    config: FashionConfig,
    seed: int,
    pdata: PhaseData,
    folder: Path,
    bar: PhaseBar,
    stop_after: int | None,
) -> dict[str, dict[str, Any]] | None:
    """Every phase of one seed (``None`` when ``stop_after`` interrupted one)."""
    dtype, dev = pdata.x_train.dtype, pdata.x_train.device
    model = FashionCNN(generator=torch.Generator().manual_seed(seed), dtype=dtype, device=dev)
    lo, hi = local_range(pdata.y_train.shape[0])  # this rank's shard under torchrun (else all)
    x, y = pdata.x_train[lo:hi], pdata.y_train[lo:hi]
    problem = Problem(model, F.cross_entropy, x, y, memory_budget=config.memory_budget)
    theta = problem.theta()
    phases: dict[str, dict[str, Any]] = {}
    for key in ("gd_phase", *config.dynamics):
        bar.start(seed, key)
        spec = phase_spec(config, seed, key)
        start = theta if key == "gd_phase" else phases["gd_phase"]["theta"]
        phase = StagePhase(folder / key, member_of(spec), start, spec.num_steps,
                           spec.checkpoint_every)  # fmt: skip
        res = run_phase(problem, phase, partial(_measure_at, data=pdata, spec=spec),
                        advance=bar.advance, stop_after=stop_after)  # fmt: skip
        if res.get("unfinished"):
            return None
        phases[key] = res
    return phases


def run_loop(
    config: FashionConfig, pdata: PhaseData, folder: Path, bar: PhaseBar, stop_after: int | None
) -> dict[int, dict[str, dict[str, Any]]] | None:
    """Every seed's phases one after the other (``None`` when ``stop_after`` interrupted one)."""
    phases: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in config.seeds:
        per_seed = _run_seed(config, seed, pdata, folder / f"seed_{seed}", bar, stop_after)
        if per_seed is None:
            return None
        phases[seed] = per_seed
    return phases


def load_phase_data(
    config: FashionConfig, data_dir: str | Path | None, dtype: torch.dtype, dev: torch.device
) -> tuple[dict[str, Any], PhaseData, str]:
    """The files' identity, the tensors a phase measures on, and the data source.

    Raises:
        DataNotFoundError: FashionMNIST is not available (the message says how to get it).
        ValueError: the files hold fewer images than ``n_train``/``n_test`` ask for.
    """
    ident: dict[str, Any] = fashion_mnist_identity(data_dir)
    if config.n_test is not None and config.n_test > ident["num_test"]:
        raise ValueError(
            f"n_test={config.n_test} test images were asked for, but the test file in "
            f"{ident['source']} holds only {ident['num_test']}; lower n_test (or leave it unset "
            "to use them all), or pass --data-dir with the full FashionMNIST files"
        )
    if config.n_train > ident["num_train"]:
        raise ValueError(
            f"n_train={config.n_train} training images were asked for, but the training file in "
            f"{ident['source']} holds only {ident['num_train']}; lower n_train or pass --data-dir "
            "with the full FashionMNIST files"
        )
    data = corrupted_fashion_mnist(
        n_train=config.n_train, n_clean=config.n_clean, seed=config.data_seed,
        data_dir=data_dir, dtype=dtype, device=dev,
    )  # fmt: skip
    n_test = config.n_test or data.y_test.shape[0]
    pdata = PhaseData(
        x_train=data.x_train,
        y_train=data.y_train,
        corrupted=data.corrupted_mask,
        y_train_original=data.y_train_original,
        x_test=data.x_test[:n_test],
        y_test=data.y_test[:n_test],
    )
    return ident, pdata, str(data.source)


def phase_spec(config: FashionConfig, seed: int, phase: str) -> PhaseSpec:
    """What ``phase`` (``"gd_phase"`` or a dynamics after the switch) of seed ``seed`` runs.

    The GD phase starts at iteration 0 with ``gd_lr`` and measures t = 0; a dynamics starts at
    θ*_GD with ``lr``, its t = 0 being the GD phase's last measurement, and its structure reads
    its own options from the config (:meth:`~sgdnoise.noise.NoiseModel.options_from`).
    """
    gd = phase == "gd_phase"
    dyn = "gd" if gd else phase
    gld = dyn.startswith("gld_")
    refresh = int(config.refresh_every.get(dyn, default_refresh(dyn) or 1))
    return PhaseSpec(
        seed=seed,
        name=phase,
        dynamics=dyn,
        num_steps=config.gd_iterations if gd else config.iterations,
        iteration_offset=0 if gd else config.gd_iterations,
        lr=config.gd_lr if gd else config.lr,
        batch_size=config.batch_size,
        refresh_every=1 if gd else refresh,
        options=noise_class(dyn[len("gld_") :]).options_from(config) if gld else {},
        eval_every=config.gd_eval_every if gd else config.eval_every,
        sharpness_every=config.gd_sharpness_every if gd else config.sharpness_every,
        indicator_every=config.gd_indicator_every if gd
        else config.indicator_every if dyn in config.indicator_dynamics else -1,
        measure_start=gd,
        sharpness_sigma=config.sharpness_sigma,
        sharpness_draws=config.sharpness_draws,
        indicator_samples=config.indicator_samples,
        indicator_trace_matvecs=config.indicator_trace_matvecs,
        # a resumed run restarts on a refresh step, so checkpoints fall on refresh steps
        checkpoint_every=math.lcm(config.checkpoint_every, refresh if gld else 1),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The progress bar's cost model
# --------------------------------------------------------------------------------------------


#: Cost of one step relative to one full-batch GD step, measured by
#: ``bench/bench_fashion_steps.py`` (2-core CPU, the quick profile's settings): the parts that do
#: not depend on the refresh period. A refresh adds :func:`_refresh_cost` / refresh period.
_STEP_COST: dict[str, float] = {
    "gd": 1.0,
    "sgd": 0.05,
    "gld_const": 1.0,
    "gld_dynamic": 1.0,
    "gld_diag": 1.0,
    "gld_leading": 1.0,
    "gld_hessian": 1.0,
    "gld_hessian_top1": 1.0,
    "gld_full": 1.0,
    "gld_multiplicative": 1.04,
}
_C_PSG = 1.6  # per-sample gradients of the training set (and Σ from them)
_C_HVP = 2.8  # one Hessian-vector product on the training set
_C_HVP_BLOCK = 1.8  # one product of a batched block (per column)
_C_EVAL = 10.0  # one evaluation on 10,000 test + 1,200 training images


def _refresh_cost(config: FashionConfig, dynamics: str) -> float:
    """Cost (GD steps) of one covariance refresh of a GLD structure."""
    if dynamics in ("gld_dynamic", "gld_diag", "gld_full"):
        return _C_PSG - 1.0  # the mean gradient comes with the per-sample ones
    if dynamics == "gld_leading":
        return 7.0
    if dynamics == "gld_hessian":
        m = config.eigen_max_matvecs or 3 * config.k
        return _C_PSG + m * _C_HVP_BLOCK
    if dynamics == "gld_hessian_top1":
        m = config.top1_max_matvecs or 20
        return _C_PSG + m * _C_HVP
    return 0.0


def _unit_costs(config: FashionConfig, phase: str) -> dict[str, float]:
    """Cost (GD steps) of one step and of one measurement of each kind, in ``phase``."""
    dyn = "gd" if phase == "gd_phase" else phase
    per_step = _STEP_COST.get(dyn, 1.0)
    if dyn.startswith("gld_"):
        per_step += _refresh_cost(config, dyn) / int(config.refresh_every.get(dyn, 1))
    n_test = config.n_test or NUM_TEST
    scale = config.n_train / 1200
    samples = config.indicator_samples or config.n_train
    return {
        "step": per_step * scale,
        "eval": _C_EVAL * (n_test + config.n_train) / 11200,
        "sharpness": config.sharpness_draws / 3 * scale,
        "indicator": (_C_PSG + (samples + config.indicator_trace_matvecs) * _C_HVP) * scale,
    }


def _row_cost(costs: Mapping[str, float], row: Mapping[str, Any] | None) -> float:
    """Cost of the measurements in one metrics row."""
    if not row:
        return 0.0
    return (
        costs["eval"] * ("test_acc" in row)
        + costs["sharpness"] * ("sharpness_signed" in row)
        + costs["indicator"] * ("tr_HS" in row)
    )


def phase_cost(config: FashionConfig, phase: str) -> float:
    """Estimated cost of a whole phase in GD steps (steps, refreshes and measurements).

    Used to weight the progress bar's ETA; the seconds per unit are measured as the run goes.
    """
    spec = phase_spec(config, 0, phase)
    steps, start = spec.num_steps, spec.measure_start
    costs = _unit_costs(config, phase)

    def count(every: int) -> int:  # measurements in the phase (as _due)
        if every < 0:
            return 0
        if every == 0:
            return 1
        return steps // every + (steps % every != 0) + start

    return (
        steps * costs["step"]
        + count(spec.eval_every) * costs["eval"]
        + count(spec.sharpness_every) * costs["sharpness"]
        + count(spec.indicator_every) * costs["indicator"]
    )


class PhaseBar:
    """The progress bar over every phase, its work weighted by :func:`phase_cost`."""

    def __init__(self, config: FashionConfig, enabled: bool) -> None:
        phases = ("gd_phase", *config.dynamics)
        total = len(config.seeds) * (
            config.gd_iterations + len(config.dynamics) * config.iterations
        )
        work = len(config.seeds) * sum(phase_cost(config, p) for p in phases)
        self.costs = {p: _unit_costs(config, p) for p in phases}
        self.bar = Progress(total, "fashion", enabled=enabled, work_total=work)
        self.phase, self.acc, self.key = "", "", "gd_phase"

    def start(self, seed: int, key: str) -> None:
        """Phase ``key`` of seed ``seed`` begins."""
        self.key = key
        name = "GD phase" if key == "gd_phase" else dynamics_label(key)
        self.phase = f"seed {seed} {name}"

    def advance(
        self, n: int, row: dict[str, Any] | None, skipped: bool = False, rows: Sequence[Any] = ()
    ) -> None:
        """``run_phase``'s progress callback (see :func:`sgdnoise.phases.run_phase`)."""
        if row is not None and "test_acc" in row:
            self.acc = f"test acc {row['test_acc']:.3f}"
        costs = self.costs[self.key]
        post = f"{self.phase} {self.acc}"
        if skipped:  # loaded steps and the measurements made along them
            loaded = n * costs["step"] + sum(_row_cost(costs, r) for r in rows)
            self.bar.skip(n, work=loaded, postfix=post)
        else:  # computed steps, plus the measurements made after them
            self.bar.update(n, postfix=post, work=n * costs["step"] + _row_cost(costs, row))
