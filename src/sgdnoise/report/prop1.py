"""The claim of Proposition 1, checked on its numerical construction."""

from __future__ import annotations

import math
from typing import Any

from ._base import Claim

__all__ = ["claims"]


def claims(r: dict[str, Any]) -> list[Claim]:
    exps = r.get("exponents")
    if not isinstance(exps, dict) or not exps:
        return []
    rows, worst = [], math.inf
    for key in sorted(exps, key=float):
        e = exps[key]
        d = float(e.get("d", key))
        slopes = [float(v["slope"]) for v in e.get("rests", {}).values() if "slope" in v]
        if not slopes:
            continue
        target = 2 * d - 1
        worst = min(worst, min(slopes) - target)
        rows.append(f"d={d:.2f}: slope {min(slopes):.2f}–{max(slopes):.2f} (2d−1 = {target:.2f})")
    bound_ok = bool(r.get("all_bounds_hold"))
    dims = r.get("dims", [])
    span = f"D = {dims[0]}…{dims[-1]}" if dims else ""
    verdict = (
        "reproduced"
        if bound_ok and worst >= -0.05
        else ("partly" if bound_ok or worst >= -0.15 else "not reproduced")
    )
    return [
        Claim(
            "prop1",
            "Proposition 1: for ill-conditioned H and Σ aligned with coefficient a, Tr(HΣ)/Tr(HΣ̄) ≥ a·D/(k + D^(1−d))², growing like a·D^(2d−1)",
            "O(a·D^(2d−1)), d > 1/2",
            f"{span}, {r.get('num_instances', '?')} instances, bound holds in all: {bound_ok}; fitted log-log slopes "
            + "; ".join(rows),
            verdict,
            "reproduced if the bound holds in every instance and every fitted slope is at least 2d − 1 − 0.05; partly if one of the two holds (slopes within 0.15)",
            f"{r.get('num_instances', '?')} deterministic instances (exact traces)",
        )
    ]
