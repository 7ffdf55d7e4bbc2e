"""Checkpointed training phases: their files, and a *stage* of phases advanced by the batched engine.

A phase is one run of one dynamics from a start θ for T steps, measured along the way; it lives in
its own folder::

    <phase>/checkpoint.pt   {"t", "theta" [D], "optim", "rows", "wall_s"}: θ_t, the optimizer's
                            state_dict (step counter, generator state, eigen solvers' warm start)
                            and the rows measured up to t
    <phase>/metrics.jsonl   the rows so far (for people; rewritten atomically)
    <phase>/final.pt        {"theta", "rows", "wall_s"}: θ_T and every row, written once at the end

Every file is written atomically, so a run killed at any moment leaves the previous or the new
version of each; a damaged checkpoint is moved aside (:func:`~sgdnoise.runs.quarantine`).

:func:`run_stage` advances several phases that take the same number of steps (e.g. every dynamics
of every seed after the switch) as the members of one :class:`~sgdnoise.engine.BatchedEngine`,
writing exactly the files the one-phase-at-a-time loop writes: its checkpoints hold the state
:meth:`~sgdnoise.ProblemOptimizer.state_dict` of that phase's optimizer would hold, so either
path resumes the other's checkpoints.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._utils import _jsonable, atomic_write_bytes, atomic_write_text, is_writer
from .engine import BatchedEngine, Member
from .optim import ProblemOptimizer, make_optimizer
from .problem import Problem
from .runs import quarantine

__all__ = [
    "StagePhase",
    "build_optimizer",
    "load_checkpoint",
    "load_final",
    "run_phase",
    "run_stage",
    "save_checkpoint",
    "write_rows",
]

#: ``measure(engine, members, t)``: the rows due at step t of the given members (``None`` where
#: nothing is due), in the order of ``members`` (indices into ``engine.members``).
MeasureFn = Callable[[BatchedEngine, Sequence[int], int], list[dict[str, Any] | None]]
#: ``advance(phase, n, row, skipped=False, rows=())``: as ``run_phase``'s progress callback, for
#: phase number ``phase`` of the stage.
AdvanceFn = Callable[..., None]


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (rank 0 alone under torchrun)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint file's content; ``None`` if it is missing, or damaged (then moved aside)."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "theta" not in obj or "rows" not in obj:
            raise ValueError("not an sgdnoise checkpoint")
        return obj
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError (zip), ...: all "damaged"
        quarantine(path, f"{type(exc).__name__}: {exc}")
        return None


def write_rows(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one JSON object per row."""
    text = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
    atomic_write_text(folder / "metrics.jsonl", text)


def load_final(folder: Path) -> dict[str, Any] | None:
    """``{"theta", "rows", "wall_s"}`` of a finished phase, or ``None`` if it has not finished."""
    return load_checkpoint(folder / "final.pt")


@dataclass
class StagePhase:
    """One phase of a stage.

    Attributes:
        folder: the phase folder. member: its dynamics, step size, options and random stream
            (the generator the loop's optimizer would be given). theta0: θ at t = 0 ``[D]``.
        num_steps: T (the same for every phase of a stage). checkpoint_every: its checkpoint
            period (a multiple of its refresh period; the stage checkpoints every phase at the
            least common multiple of the periods, so each checkpoint lies on one of its own).
    """

    folder: Path
    member: Member
    theta0: torch.Tensor
    num_steps: int
    checkpoint_every: int


def build_optimizer(
    problem: Problem, member: Member, generator: torch.Generator | None = None
) -> ProblemOptimizer:
    """The optimizer that runs ``member`` alone (:func:`~sgdnoise.make_optimizer`), with its
    generator (or ``generator``); GD ignores the generator, the batch size and the refresh."""
    m = member
    return make_optimizer(m.dynamics, problem, m.lr, seed=m.seed, generator=generator or m.generator,
                          batch_size=m.batch_size, replacement=m.replacement,
                          refresh_every=m.refresh_every, **m.options)  # fmt: skip


def _start(
    problem: Problem,
    phase: StagePhase,
    measure: Callable[[Problem, int], dict[str, Any] | None],
    advance: Callable[..., None] | None,
) -> tuple[ProblemOptimizer, int, list[dict[str, Any]], float]:
    """The optimizer, first step, rows so far and wall time: from the checkpoint if there is one,
    else from ``theta0`` (measuring t = 0)."""
    ckpt = load_checkpoint(phase.folder / "checkpoint.pt")
    if ckpt is not None:
        t0, rows, wall = int(ckpt["t"]), list(ckpt["rows"]), float(ckpt["wall_s"])
        problem.set_theta(ckpt["theta"].to(problem.device, problem.dtype))
        opt = build_optimizer(problem, phase.member)
        state = ckpt["optim"]
        if ckpt.get("warm") is not None:  # checkpoints written before GLD saved its warm start
            extra = state.setdefault("sgdnoise", {})
            extra.setdefault("noise_warm_state", {"eigenvectors": ckpt["warm"]})
        opt.load_state_dict(state)
        if advance is not None:
            advance(t0, None, skipped=True, rows=rows)
    else:
        t0, rows, wall = 0, [], 0.0
        problem.set_theta(phase.theta0.to(problem.device, problem.dtype))
        opt = build_optimizer(problem, phase.member)
        row = measure(problem, 0)
        if row is not None:
            rows.append(row)
            if advance is not None:
                advance(0, row)
    return opt, t0, rows, wall


def run_phase(
    problem: Problem,
    phase: StagePhase,
    measure: Callable[[Problem, int], dict[str, Any] | None],
    *,
    advance: Callable[..., None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume, or just load) one phase alone; returns ``{"theta", "rows", "wall_s"}``.

    Args:
        problem: the training problem; its model's parameters are overwritten.
        phase: what to run (its member's optimizer is :func:`build_optimizer`'s) and where.
        measure: ``measure(problem, t)``: the row due at θ_t (the problem's θ), or ``None``.
        advance: progress callback ``advance(n, row, skipped=False)``: n more steps are done
            (``skipped=True`` and ``rows=`` the loaded rows, with all T for a phase that had
            finished or t for a resumed one; 0 with the row measured at t = 0; then 1 per
            computed step), row = the metrics measured after that step or ``None``.
        stop_after: testing hook: return (without finishing) after this many steps of this call.
    """
    folder, T = phase.folder, phase.num_steps
    folder.mkdir(parents=True, exist_ok=True)
    done = load_final(folder)
    if done is not None:
        if advance is not None:
            advance(T, None, skipped=True, rows=done["rows"])
        return done
    ckpt_path = folder / "checkpoint.pt"
    start = time.perf_counter()
    opt, t0, rows, wall = _start(problem, phase, measure, advance)
    for t in range(t0, T):
        opt.step()
        row = measure(problem, t + 1)
        if row is not None:
            rows.append(row)
        if (t + 1) % phase.checkpoint_every == 0 and t + 1 < T:
            save_checkpoint(ckpt_path, {
                "t": t + 1, "theta": problem.theta().cpu(), "optim": opt.state_dict(),
                "rows": rows, "wall_s": wall + time.perf_counter() - start,
            })  # fmt: skip
            write_rows(folder, rows)
        if advance is not None:
            advance(1, row)
        if stop_after is not None and t + 1 - t0 >= stop_after and t + 1 < T:
            return {"theta": problem.theta(), "rows": rows, "wall_s": math.nan, "unfinished": True}
    final = {
        "theta": problem.theta().cpu(),
        "rows": rows,
        "wall_s": wall + time.perf_counter() - start,
    }
    write_rows(folder, rows)
    save_checkpoint(folder / "final.pt", final)
    if ckpt_path.exists() and is_writer():
        ckpt_path.unlink()
    return final


def run_stage(
    problem: Problem,
    phases: Sequence[StagePhase],
    measure: MeasureFn,
    *,
    advance: AdvanceFn | None = None,
    stop_after: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or load) the phases of a stage together in one :class:`BatchedEngine`.

    Finished phases (``final.pt``) are loaded; the others resume from their checkpoints. Phases
    whose checkpoints are at different steps (e.g. left by a loop run) are run as one engine per
    starting step, in order. ``wall_s`` of a phase is its share of the engine's time (the stage's
    seconds divided by its members), plus any time recorded in its checkpoint.

    Args:
        problem: the problem (shared by the members; its θ is overwritten).
        phases: the phases; every unfinished one must have the same ``num_steps``.
        measure: the rows due at step t (see :data:`MeasureFn`); called at t = 0 for a fresh start.
        advance: progress callback (see :data:`AdvanceFn`).
        stop_after: testing hook: stop (leaving checkpoints) after this many steps of this call.
        say: called once per engine with :meth:`~sgdnoise.engine.EnginePlan.describe`.

    Returns:
        One ``{"theta", "rows", "wall_s"}`` per phase, in order; ``"unfinished": True`` in those
        that ``stop_after`` interrupted.

    Raises:
        ValueError: unfinished phases with different ``num_steps``, or a checkpoint whose step
            counter disagrees with its ``t``.
        MemoryError: the members do not fit the problem's memory budget
            (:func:`~sgdnoise.engine.plan_members`).
    """
    results: list[dict[str, Any] | None] = [None] * len(phases)
    waiting: dict[int, list[tuple[int, dict[str, Any] | None]]] = {}
    for i, ph in enumerate(phases):
        ph.folder.mkdir(parents=True, exist_ok=True)
        done = load_final(ph.folder)
        if done is not None:
            results[i] = done
            if advance is not None:
                advance(i, ph.num_steps, None, skipped=True, rows=done["rows"])
            continue
        ckpt = load_checkpoint(ph.folder / "checkpoint.pt")
        waiting.setdefault(int(ckpt["t"]) if ckpt is not None else 0, []).append((i, ckpt))
    steps = {phases[i].num_steps for group in waiting.values() for i, _ in group}
    if len(steps) > 1:
        raise ValueError(f"the phases of a stage must take the same number of steps, got {steps}")
    for t0 in sorted(waiting):
        group = waiting[t0]
        runner = _Group(problem, [phases[i] for i, _ in group], [c for _, c in group], t0)
        if say is not None:
            say(runner.engine.plan.describe())
        ids = [i for i, _ in group]

        def adv(r: int, *a: Any, _ids: list[int] = ids, **k: Any) -> None:
            if advance is not None:
                advance(_ids[r], *a, **k)

        for i, res in zip(ids, runner.run(measure, adv, stop_after), strict=True):
            results[i] = res
        if any(r.get("unfinished") for r in results if r is not None):
            break
    return [r if r is not None else {"unfinished": True} for r in results]


class _Group:
    """Phases that start at the same step t0, as the members of one engine."""

    def __init__(
        self,
        problem: Problem,
        phases: list[StagePhase],
        ckpts: list[dict[str, Any] | None],
        t0: int,
    ) -> None:
        self.problem, self.phases, self.t0 = problem, phases, t0
        theta = torch.stack([
            (c["theta"] if c is not None else ph.theta0).to(problem.device, problem.dtype)
            for ph, c in zip(phases, ckpts, strict=True)
        ])  # fmt: skip
        self.engine = BatchedEngine(problem, [ph.member for ph in phases], theta)
        self.rows = [list(c["rows"]) if c is not None else [] for c in ckpts]
        self.wall = [float(c["wall_s"]) if c is not None else 0.0 for c in ckpts]
        self.every = math.lcm(*(ph.checkpoint_every for ph in phases))
        if t0 > 0:
            self.engine.load_state_dict(self._engine_state(ckpts))

    def _engine_state(self, ckpts: list[dict[str, Any] | None]) -> dict[str, Any]:
        """The engine's state from the phases' checkpoints (optimizer state_dict format)."""
        gens, warms = [], []
        for j, c in enumerate(ckpts):
            assert c is not None
            extra = dict(c["optim"].get("sgdnoise", {}))
            if int(extra.get("num_steps", self.t0)) != self.t0:
                raise ValueError(
                    f"{self.phases[j].folder / 'checkpoint.pt'}: optimizer step counter "
                    f"{extra.get('num_steps')} differs from t = {self.t0}; delete the checkpoint"
                )
            gens.append(extra.get("generator_state", self.engine.generators[j].get_state()))
            warm = dict(extra.get("noise_warm_state") or {})
            if not warm and c.get("warm") is not None:  # checkpoints before GLD saved it
                warm = {"eigenvectors": c["warm"]}
            warms.append(warm)
        return {"theta": self.engine.theta, "num_steps": self.t0, "generator_states": gens,
                "warm_states": warms}  # fmt: skip

    def _optim_state(self, j: int) -> dict[str, Any]:
        """Member j's state as its optimizer's ``state_dict()`` would give it."""
        m, e = self.phases[j].member, self.engine
        state = build_optimizer(self.problem, m, torch.Generator()).state_dict()
        extra: dict[str, Any] = {"num_steps": e.num_steps}
        if m.dynamics != "gd":
            extra["generator_state"] = e.generators[j].get_state()
        if m.structure is not None:
            noise = e.noise[j]
            warm = noise.warm_state() if noise is not None else {}
            extra["noise_warm_state"] = {k: v.cpu() for k, v in warm.items()}
        state["sgdnoise"] = extra
        return state

    def _checkpoint(self, elapsed: float) -> None:
        share = elapsed / len(self.phases)
        for j, ph in enumerate(self.phases):
            save_checkpoint(ph.folder / "checkpoint.pt", {
                "t": self.engine.num_steps, "theta": self.engine.theta[j].cpu(),
                "optim": self._optim_state(j), "rows": self.rows[j],
                "wall_s": self.wall[j] + share,
            })  # fmt: skip
            write_rows(ph.folder, self.rows[j])

    def run(self, measure: MeasureFn, advance: AdvanceFn, stop_after: int | None) -> list[dict]:
        e, M, T = self.engine, len(self.phases), self.phases[0].num_steps
        members = list(range(M))
        start = time.perf_counter()
        if self.t0 > 0:
            for j in members:
                advance(j, self.t0, None, skipped=True, rows=self.rows[j])
        else:
            for j, row in enumerate(measure(e, members, 0)):
                if row is not None:
                    self.rows[j].append(row)
                    advance(j, 0, row)
        for t in range(self.t0, T):
            e.step()
            for j, row in enumerate(measure(e, members, t + 1)):
                if row is not None:
                    self.rows[j].append(row)
                advance(j, 1, row)
            if (t + 1) % self.every == 0 and t + 1 < T:
                self._checkpoint(time.perf_counter() - start)
            if stop_after is not None and t + 1 - self.t0 >= stop_after and t + 1 < T:
                return [{"theta": e.theta[j].clone(), "rows": self.rows[j], "wall_s": math.nan,
                         "unfinished": True} for j in members]  # fmt: skip
        share = (time.perf_counter() - start) / M
        out = []
        for j, ph in enumerate(self.phases):
            final = {
                "theta": e.theta[j].cpu(),
                "rows": self.rows[j],
                "wall_s": self.wall[j] + share,
            }
            write_rows(ph.folder, self.rows[j])
            save_checkpoint(ph.folder / "final.pt", final)
            ckpt = ph.folder / "checkpoint.pt"
            if ckpt.exists() and is_writer():
                ckpt.unlink()
            out.append(final)
        return out
