"""What every experiment's claims share: the :class:`Claim` row, the verdicts, number formats and
the dynamics lists taken from the noise-structure registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..optim import dynamics_family, dynamics_label, dynamics_names

__all__ = ["VERDICTS", "Claim", "family", "fmt", "mean_std", "seeds_basis", "short"]


@dataclass(frozen=True)
class Claim:
    """One row of the claims table (``basis``: what the verdict rests on, e.g. "3 seeds")."""

    experiment: str
    claim: str
    paper: str
    ours: str
    verdict: str
    rule: str
    basis: str = ""


VERDICTS = (
    "reproduced",
    "partly",
    "not reproduced",
    "not measurable",
    "not tested (smoke)",
    "not run",
)


def seeds_basis(n: int, what: str = "seed") -> str:
    if n <= 0:
        return ""
    if n == 1:
        return f"1 {what} — indicative (no spread measured)"
    return f"{n} {what}s"


def mean_std(entry: Any, key: str) -> tuple[float, float]:
    """(mean, std) of ``entry[key]`` whether it is a number or ``{"mean", "std"}``."""
    v = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(v, dict):
        return float(v.get("mean", math.nan)), float(v.get("std", 0.0) or 0.0)
    if isinstance(v, int | float):
        std = entry.get(f"{key}_std", 0.0) if isinstance(entry, dict) else 0.0
        return float(v), float(std or 0.0)
    return math.nan, math.nan


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean != mean:
        return "n/a"
    if std is None or std != std or std == 0:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


def family(results: dict[str, Any], which: str) -> list[str]:
    """The registered dynamics of ``which`` family (``"aligned"``/``"isotropic"``) in ``results``."""
    return [k for k in dynamics_names() if k in results and dynamics_family(k) == which]


def short(name: str) -> str:
    """The registry's label without "GLD " (``"gld_hessian"`` → ``"Hessian"``)."""
    return dynamics_label(name).removeprefix("GLD ")
