"""Reading and drawing a :class:`~sgdnoise.Monitor`'s JSON-lines file (matplotlib is imported
only inside :func:`plot_monitor`)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_monitor"]


_LABELS = {
    "loss": ("probe loss", r"$L(\theta)$"),
    "tr_HS": ("escape indicator", r"$\mathrm{Tr}(H\Sigma_b)$"),
    "tr_HS_iso": ("escape indicator", r"$\mathrm{Tr}(H\bar{\Sigma})$ (isotropic)"),
    "lambda_max": ("top Hessian eigenvalue", r"$\lambda_{\max}(H)$"),
    "tr_H": ("Hessian trace", r"$\mathrm{Tr}\,H$"),
    "tr_S": ("noise trace", r"$\mathrm{Tr}\,\Sigma_b$"),
    "b_simple": (
        "gradient noise scale",
        r"$B_{\mathrm{simple}}=\mathrm{Tr}\,\Sigma_1/\|\nabla L\|^2$",
    ),
    "alignment": ("alignment (Prop. 1)", r"$a$"),
    "sharpness": ("expected sharpness", r"$E_\nu L(\theta+\nu)-L(\theta)$"),
}


def _series(
    records: list[dict[str, Any]], name: str
) -> tuple[list[float], list[float], list[float]]:
    steps, values, errs = [], [], []
    for rec in sorted(records, key=lambda r: r["step"]):
        entry = rec["quantities"].get(name)
        if entry is None or entry.get("value") is None:
            continue
        steps.append(rec["step"])
        values.append(float(entry["value"]))
        errs.append(float(entry.get("stderr") or 0.0))
    return steps, values, errs


def _log_scale(values: Sequence[float]) -> bool:
    """Log scale when every value is positive and they span at least a decade."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def _draw_panel(ax: Any, records: list[dict[str, Any]], names: list[str]) -> None:
    """One quantity panel (two for Tr(HΣ_b) and Tr(HΣ̄)), ±1 standard error bands."""
    from matplotlib.ticker import MaxNLocator

    every_value: list[float] = []
    for j, name in enumerate(names):
        steps, values, errs = _series(records, name)
        if not steps:
            continue
        every_value += values
        style = {"ls": ":" if j else "-", "marker": "o", "ms": 3}
        line = ax.plot(steps, values, label=_LABELS[name][1], **style)[0]
        if any(errs):
            lo = [v - e for v, e in zip(values, errs, strict=True)]
            hi = [v + e for v, e in zip(values, errs, strict=True)]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if _log_scale(every_value):
        ax.set_yscale("log")
    title = _LABELS[names[0]][0]
    if names[0] == "sharpness":
        sigma = next(
            (
                r["quantities"]["sharpness"].get("sigma")
                for r in records
                if "sharpness" in r["quantities"]
            ),
            None,
        )
        title += f" (σ = {sigma:g})" if sigma is not None else ""
    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(names) > 1:
        ax.legend(fontsize=9)
    else:
        ax.set_ylabel(_LABELS[names[0]][1])
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _draw_costs(cost_ax: Any, records: list[dict[str, Any]]) -> None:
    """Wall-clock seconds of each computation against the step."""
    from matplotlib.ticker import MaxNLocator

    sources: dict[str, tuple[list[int], list[float]]] = {}
    for rec in sorted(records, key=lambda r: r["step"]):
        seen = set()
        for entry in rec["quantities"].values():
            src = entry.get("source", "?")
            if src in seen:
                continue
            seen.add(src)
            s, t = sources.setdefault(src, ([], []))
            s.append(rec["step"])
            t.append(float(entry["seconds"]))
    all_t = []
    for src, (s, t) in sources.items():
        cost_ax.plot(s, t, marker=".", label=src)
        all_t += t
    if _log_scale(all_t):
        cost_ax.set_yscale("log")
    cost_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    cost_ax.set_title("cost of each computation")
    cost_ax.set_ylabel("wall-clock seconds")
    cost_ax.set_xlabel("training step")
    cost_ax.legend(fontsize=7)
    cost_ax.grid(alpha=0.3)


def plot_monitor(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw every quantity of a monitor file against the step; returns the PNG's path.

    One panel per quantity (Tr(HΣ_b) and Tr(HΣ̄) share one), a band of ±1 standard error where
    there is one, a log scale where the values are positive and span a decade or more, and a last
    panel with the wall-clock cost of each computation. Reads the file only.

    Args:
        path: the JSON-lines file written by :class:`Monitor`.
        out: the PNG to write (default: ``path`` with the suffix ``.png``).
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures untouched

    from .._utils import atomic_write_bytes
    from ..monitor import QUANTITIES, read_monitor

    records = read_monitor(path)
    present = [n for n in QUANTITIES if any(n in r["quantities"] for r in records)]
    panels: list[list[str]] = []
    for name in present:
        if name == "tr_HS_iso" and "tr_HS" in present:
            continue
        panels.append(
            ["tr_HS", "tr_HS_iso"] if name == "tr_HS" and "tr_HS_iso" in present else [name]
        )
    n_panels = len(panels) + 1  # + the cost panel
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    first = records[0]
    fig.suptitle(
        f"sgdnoise monitor: probe N = {first.get('num_probe')}, D = {first.get('dim')}, "
        f"b = {first.get('batch_size')}",
        fontsize=12,
    )
    for ax, names in zip(flat, panels, strict=False):
        _draw_panel(ax, records, names)
    _draw_costs(flat[len(panels)], records)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    target = Path(out) if out is not None else Path(path).with_suffix(".png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buf.getvalue())
    return target
