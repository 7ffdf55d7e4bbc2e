"""The FashionMNIST protocol on the batched engine (``sgdnoise fashion --engine batched``).

Two stages, each one :func:`~sgdnoise.phases.run_stage`: the GD phases of every seed (from each
seed's initialisation), then every dynamics of every seed after the switch (each from its seed's
θ*_GD). A member runs its phase's :class:`~.fashion_run.PhaseSpec` with the generator the loop
gives that phase, is measured at the same steps with the same generators, and its phase folder
receives the same files, so ``results.json`` equals the loop's up to rounding and either engine
resumes the other's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .._utils import is_writer
from ..engine import BatchedEngine
from ..models import FashionCNN
from ..phases import StagePhase, run_stage
from ..problem import Problem
from ..runs import notice
from ..sharpness import expected_sharpness_members
from .fashion_run import (
    PhaseBar,
    PhaseData,
    PhaseSpec,
    _due_kinds,
    _eval_fields,
    _generator,
    _indicator_fields,
    _sharpness_fields,
    member_of,
    phase_spec,
)

if TYPE_CHECKING:
    from .fashion import FashionConfig

__all__ = ["measure_members", "run_batched"]


def measure_members(
    engine: BatchedEngine,
    idx: Sequence[int],
    t: int,
    *,
    data: PhaseData,
    specs: Sequence[PhaseSpec],
) -> list[dict[str, Any] | None]:
    """:func:`measure` for members ``idx`` of a batched engine (member j runs ``specs[j]``): one
    batched evaluation of every member, one batched sharpness pass (each member's draws from the
    generator the loop gives its phase), the indicator member by member."""
    due = {j: _due_kinds(specs[j], t) for j in idx}
    rows: dict[int, dict[str, Any]] = {
        j: {"t": t, "iteration": specs[j].iteration_offset + t} for j in idx if any(due[j])
    }
    if any(due[j][0] for j in rows):
        bad = data.corrupted
        test = engine.evaluate(data.x_test, data.y_test)
        train = engine.evaluate(data.x_train, data.y_train)
        some = bool(bad.any())
        ok_true = (
            engine.evaluate(data.x_train[bad], data.y_train_original[bad])[0] if some else None
        )
        for j in (j for j in rows if due[j][0]):
            fields = _eval_fields((test[0][j], test[1][j]), (train[0][j], train[1][j]), bad,
                                  ok_true[j] if ok_true is not None else None)  # fmt: skip
            rows[j].update(fields)
    sharp = [j for j in rows if due[j][1]]
    if sharp:
        s0 = specs[sharp[0]]  # sigma and draws come from the config: the same for every phase
        gens = [_generator(specs[j].seed, specs[j].name, t, "sharpness") for j in sharp]
        found = expected_sharpness_members(engine.losses, engine.theta[sharp], s0.sharpness_sigma,
                                           s0.sharpness_draws, gens)  # fmt: skip
        for j, es in zip(sharp, found, strict=True):
            rows[j].update(_sharpness_fields(es))
    for j in (j for j in rows if due[j][2]):
        engine.problem.set_theta(engine.theta[j])
        rows[j].update(_indicator_fields(engine.problem, specs[j], t))
    return [rows.get(j) for j in idx]


def run_batched(
    config: FashionConfig, pdata: PhaseData, folder: Path, bar: PhaseBar, stop_after: int | None
) -> dict[int, dict[str, dict[str, Any]]] | None:
    """Every phase of every seed, stage by stage (``None`` when ``stop_after`` interrupted one).

    Returns:
        ``{seed: {phase: {"theta", "rows", "wall_s"}}}`` as the loop's ``_run_seed`` per seed.
    """
    dtype, dev = pdata.x_train.dtype, pdata.x_train.device
    models = {s: FashionCNN(generator=torch.Generator().manual_seed(s), dtype=dtype, device=dev)
              for s in config.seeds}  # fmt: skip
    problem = Problem(models[config.seeds[0]], F.cross_entropy, pdata.x_train, pdata.y_train,
                      memory_budget=config.memory_budget)  # fmt: skip
    starts = {s: problem.flatten([dict(m.named_parameters())[n].detach() for n in problem.param_names])
              for s, m in models.items()}  # fmt: skip
    phases: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in config.seeds}
    for keys in (("gd_phase",), tuple(config.dynamics)):
        specs = [phase_spec(config, s, k) for s in config.seeds for k in keys]
        stage = [
            StagePhase(folder / f"seed_{sp.seed}" / sp.name, member_of(sp),
                       starts[sp.seed] if sp.name == "gd_phase"
                       else phases[sp.seed]["gd_phase"]["theta"],
                       sp.num_steps, sp.checkpoint_every)
            for sp in specs
        ]  # fmt: skip

        def advance(i: int, *args: Any, _specs: list[PhaseSpec] = specs, **kw: Any) -> None:
            bar.start(_specs[i].seed, _specs[i].name)
            bar.advance(*args, **kw)

        done = run_stage(problem, stage, partial(measure_members, data=pdata, specs=specs),
                         advance=advance, stop_after=stop_after,
                         say=notice if is_writer() else None)  # fmt: skip
        if any(r.get("unfinished") for r in done):
            return None
        for sp, res in zip(specs, done, strict=True):
            phases[sp.seed][sp.name] = res
    return phases
