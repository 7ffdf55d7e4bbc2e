"""The batched engine's members and memory plan (see :mod:`sgdnoise.engine`).

:class:`Member` says what one member runs; :func:`plan_members` sizes the member groups and data
chunks of the engine's passes to the problem's memory budget (:class:`EnginePlan`);
:func:`resolve_engine` picks the loop or the engine for a device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._optim_params import materializes
from .noise import noise_class
from .problem import Problem
from .problem._helpers import PER_SAMPLE_CHUNK_NUMBERS

__all__ = ["EnginePlan", "Member", "keeps_per_sample", "plan_members", "resolve_engine"]


@dataclass(frozen=True)
class Member:
    """One member of a batched run: a dynamics with its step size, options and random stream.

    Attributes:
        dynamics: ``"gd"``, ``"sgd"`` or ``"gld_<structure>"`` (see :func:`sgdnoise.dynamics_names`).
        lr: step size η.
        seed, generator: the member's random stream (the package's rule: the generator wins,
            else a fresh generator seeded with ``seed``) — as given to :func:`make_optimizer`.
        batch_size, replacement, refresh_every: as for :func:`make_optimizer`.
        options: the structure's options (GLD only).
    """

    dynamics: str
    lr: float
    seed: int | None = 0
    generator: torch.Generator | None = None
    batch_size: int = 1
    replacement: bool = True
    refresh_every: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def structure(self) -> str | None:
        """The noise structure's name for a GLD member, else ``None``."""
        return self.dynamics[len("gld_") :] if self.dynamics.startswith("gld_") else None


@dataclass(frozen=True)
class EnginePlan:
    """How the engine splits its work to stay within the device's memory budget.

    Attributes:
        members: M. group: members evaluated together in one vmapped pass.
        rows: samples per chunk of a batched gradient pass (per-sample passes: ``per_sample_rows``).
        per_sample_rows: samples per chunk of a batched per-sample gradient pass.
        budget_bytes: the problem's :attr:`~sgdnoise.Problem.memory_budget`.
        resident_bytes: bytes held between steps (θ and the per-sample buffers of every member).
        device: the device, as text.
    """

    members: int
    group: int
    rows: int
    per_sample_rows: int
    budget_bytes: int
    resident_bytes: int
    device: str

    def describe(self) -> str:
        """One line saying what was chosen, e.g. for a log."""
        gib = 2.0**30
        return (
            f"batched engine on {self.device}: {self.members} members in groups of {self.group}, "
            f"{self.rows} rows per gradient chunk, {self.per_sample_rows} per per-sample chunk; "
            f"{self.resident_bytes / gib:.2f} GiB resident, budget {self.budget_bytes / gib:.2f} GiB"
        )


def keeps_per_sample(member: Member, problem: Problem) -> bool:
    s = member.structure
    return s is not None and noise_class(s).needs_per_sample and materializes(problem)


def plan_members(problem: Problem, members: Sequence[Member]) -> EnginePlan:
    """Size the member groups and data chunks to the problem's memory budget.

    The budget is :attr:`Problem.memory_budget` (half the free memory of the device at the first
    pass, unless the problem was given one). Every member holds θ (and, for structures refreshed
    from per-sample gradients, its ``[N, D]`` matrix); what is left is shared by one pass over a
    group of members: ``group`` is the largest number of members for which a one-row chunk of a
    per-sample pass fits, and each pass's rows per chunk are what the rest of the budget allows
    for ``group`` members at once (the Problem's cost model behind :meth:`Problem.plan_rows`,
    capped at its ``chunk_size`` and N).

    Args:
        problem: the problem the members train.
        members: the members.

    Returns:
        The :class:`EnginePlan`.

    Raises:
        MemoryError: the members' resident tensors alone exceed the budget (the message says how
            much they need), or one sample of one member does not fit (:meth:`Problem.plan_rows`).
    """
    item = torch.finfo(problem.dtype).bits // 8
    N, D = problem.num_samples, problem.dim
    resident = sum(D * item * 3 + N * D * item * keeps_per_sample(m, problem) for m in members)
    budget = problem.memory_budget
    if resident >= budget:
        raise MemoryError(
            f"the {len(members)} members hold {resident / 2**30:.2f} GiB between steps, more than "
            f"the memory budget of {budget / 2**30:.2f} GiB; run fewer members at once (e.g. one "
            "seed at a time) or give the Problem a larger memory_budget"
        )
    problem.plan_rows("per_sample")  # MemoryError if one sample of one member does not fit
    fixed, per = problem._cost("per_sample")  # the Problem's model of a pass's peak bytes
    group = max(1, min(len(members), int((budget - resident) // (fixed + per))))
    ps_rows = min(
        _rows(problem, "per_sample", group, budget - resident),
        max(1, PER_SAMPLE_CHUNK_NUMBERS // (D * group)),  # as Problem.per_sample_chunk_size
    )
    grad_rows = _rows(problem, "gradient", group, budget - resident)
    return EnginePlan(
        members=len(members),
        group=group,
        rows=grad_rows,
        per_sample_rows=ps_rows,
        budget_bytes=budget,
        resident_bytes=resident,
        device=str(problem.device),
    )


def _rows(problem: Problem, kind: str, group: int, budget: float) -> int:
    """Samples per chunk of a pass of ``kind`` over ``group`` members within ``budget`` bytes."""
    fixed, per = problem._cost(kind)
    rows = int((budget - group * fixed) // max(group * per, 1.0))
    return max(1, min(rows, problem.chunk_size or problem.num_samples, problem.num_samples))


def resolve_engine(engine: str, device: torch.device | str) -> str:
    """``"loop"`` or ``"batched"`` for a requested engine on ``device``.

    ``"auto"`` is ``"batched"`` on CUDA (a small model cannot fill a GPU one member at a time) and
    ``"loop"`` on the CPU, where ``bench/bench_engine.py`` measures the batched engine no faster
    than the per-dynamics loop (the CPU's cores are busy with one member's convolutions already).

    Args:
        engine: ``"auto"``, ``"loop"`` or ``"batched"``.
        device: the run's device.

    Returns:
        ``"loop"`` or ``"batched"``.

    Raises:
        ValueError: another engine name.
    """
    if engine not in ("auto", "loop", "batched"):
        raise ValueError(f"engine must be 'auto', 'loop' or 'batched', got {engine!r}")
    if engine != "auto":
        return engine
    return "batched" if torch.device(device).type == "cuda" else "loop"
