"""Small statistics shared by the experiments: mean ± sample std over seeds, curves, slopes.

Every helper skips missing (``None``) and non-finite values, so a dead run or an unmeasured
point never turns a mean into NaN; the standard deviation is the sample one (ddof 1), ``None``
for fewer than two values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard

__all__ = [
    "curve_over_seeds",
    "finite",
    "finite_min",
    "is_finite",
    "loglog_slope",
    "mean_std",
    "stat",
]


def is_finite(value: float | None) -> TypeGuard[float]:
    """Whether ``value`` is a number that is neither NaN nor ±inf (``None``: no)."""
    return value is not None and math.isfinite(float(value))


def finite(values: Iterable[float | None]) -> list[float]:
    """The finite values of ``values`` as floats (``None``, NaN and ±inf dropped)."""
    return [float(v) for v in values if is_finite(v)]


def mean_std(
    values: Iterable[float | None], *, empty: float | None = None
) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1) of the finite values.

    Args:
        values: numbers; ``None`` and non-finite ones are left out.
        empty: the mean returned when no value is finite.

    Returns:
        ``(mean, std)``: ``mean`` is ``empty`` without a finite value, ``std`` is ``None`` with
        fewer than two.
    """
    v = finite(values)
    if not v:
        return empty, None
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, None
    return mean, math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` of per-seed values (see :func:`mean_std`).

    ``n`` counts the finite values; ``values`` keeps every value as given (``None`` kept).
    """
    mean, std = mean_std(values)
    return {
        "mean": mean,
        "std": std,
        "n": len(finite(values)),
        "values": [float(v) if v is not None else None for v in values],
    }


def finite_min(values: Iterable[float | None]) -> float:
    """The smallest finite value (NaN when there is none)."""
    v = finite(values)
    return min(v) if v else float("nan")


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` over the points with both positive.

    Returns:
        The slope; ``None`` with fewer than two such points or a single distinct ``x``.
    """
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys, strict=True) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def curve_over_seeds(
    rows_per_seed: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> dict[str, Any]:
    """Mean/std over seeds of ``key`` along the rows where it was measured.

    Args:
        rows_per_seed: per seed, metric rows with an ``"iteration"`` (the first seed's give the
            x axis); the i-th measured row of every seed is averaged, up to the shortest seed.
        key: the metric.

    Returns:
        ``{"iteration", "mean", "std"}`` lists, plus ``"stderr"`` (the Monte-Carlo standard error
        of the seed mean, ``√(Σ se²)/n``) when the rows carry ``<key>_stderr``.
    """
    series = [[r for r in rows if r.get(key) is not None] for rows in rows_per_seed]
    length = min(len(s) for s in series) if series else 0
    its = [series[0][i]["iteration"] for i in range(length)]
    mean, std = [], []
    for i in range(length):
        m, s = mean_std([row[i][key] for row in series])
        mean.append(m)
        std.append(s)
    out: dict[str, Any] = {"iteration": its, "mean": mean, "std": std}
    err_key = f"{key}_stderr"
    if length and err_key in series[0][0]:
        out["stderr"] = [
            math.sqrt(sum(float(s[i].get(err_key) or 0.0) ** 2 for s in series)) / len(series)
            for i in range(length)
        ]
    return out
