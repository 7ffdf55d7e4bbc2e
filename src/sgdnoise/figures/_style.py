"""Drawing helpers shared by the figure modules (matplotlib is imported inside the functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._utils import atomic_write_bytes

__all__ = ["band", "colors", "legend_outside", "pyplot", "read_json", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path_stem: str | Path) -> list[Path]:
    """Save a figure as ``<stem>.png`` (130 dpi) and ``<stem>.svg`` (atomically) and close it.

    Returns:
        The two paths written.
    """
    import io

    stem = Path(path_stem)
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130 if ext == "png" else None, bbox_inches="tight")
        atomic_write_bytes(stem.with_suffix(f".{ext}"), buf.getvalue())
        out.append(stem.with_suffix(f".{ext}"))
    pyplot().close(fig)
    return out


def read_json(run_dir: str | Path, name: str, experiment: str) -> Any:
    """A JSON file of a run directory.

    Raises:
        FileNotFoundError: the file is missing (the message says which command writes it).
        ValueError: the file is not valid JSON (the message names it).
    """
    from ..runs import RunDir

    path = Path(run_dir) / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; run `sgdnoise {experiment} --out {Path(run_dir)}` first"
        )
    return RunDir(run_dir).read_json(name)


def colors(names: list[str]) -> dict[str, Any]:
    """One ``tab10`` colour per dynamics name, in the order given (cycling after ten)."""
    cmap = pyplot().get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def band(ax: Any, curve: Mapping[str, Any], label: str, **kw: Any) -> None:
    """A mean curve ``{"iteration", "mean", "std"}`` with a ± one std band where std exists."""
    x = curve["iteration"]
    m = [math.nan if v is None else v for v in curve["mean"]]
    (line,) = ax.plot(x, m, label=label, **kw)
    if any(s is not None for s in curve["std"]):
        s = [0.0 if v is None else v for v in curve["std"]]
        lo = [a - b for a, b in zip(m, s, strict=True)]
        hi = [a + b for a, b in zip(m, s, strict=True)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)


def legend_outside(ax: Any, **kw: Any) -> None:
    """The legend to the right of the axes, so that it never covers data (none if empty)."""
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)
