"""Figures of the 2-D escape experiment (poster Fig. 1) from a finished run directory.

Reads ``results.json`` (per dynamics: label, success rate, Wilson interval, Tr(HΣ)) and the two
files the run writes for drawing, ``trajectories.json`` (one run's path per dynamics) and
``surface.json`` (the loss surface of that run's data on a grid); recomputes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._style import colors, pyplot, read_json, save_figure

__all__ = ["plot"]


def _trajectories(run_dir: Path, results: dict[str, Any], color: dict[str, Any]) -> list[Path]:
    """``toy_trajectories``: one path per dynamics over the loss contours."""
    import torch

    plt = pyplot()
    paths = read_json(run_dir, "trajectories.json", "toy")
    surf = read_json(run_dir, "surface.json", "toy")
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    Z = torch.tensor(surf["loss"])
    levels = torch.quantile(Z.flatten(), torch.linspace(0.0, 0.9, 25, dtype=Z.dtype)).tolist()
    ax.contour(
        surf["x"], surf["y"], Z.numpy(), levels=sorted(set(levels)), cmap="Greys", linewidths=0.6
    )
    for n, entry in results.items():
        p = torch.tensor(paths["paths"][n])
        ax.plot(p[:, 0], p[:, 1], "-", lw=1.0, color=color[n], label=entry["label"], alpha=0.9)
        ax.plot(p[-1, 0], p[-1, 1], "o", ms=4, color=color[n])
    ax.plot([1], [1], "k*", ms=10, label="start (sharp minimum)")
    ax.set_xlabel("$w_1$")
    ax.set_ylabel("$w_2$")
    ax.set_title(
        f"one trajectory per dynamics (run {paths['run']}, every {paths['every']}th iterate)"
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    return save_figure(fig, run_dir / "toy_trajectories")


def _success(run_dir: Path, results: dict[str, Any], color: dict[str, Any]) -> list[Path]:
    """``toy_success``: success rates with 95% Wilson intervals, Tr(HΣ) written above each bar."""
    plt = pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    rates = [100 * results[n]["success_rate"] for n in names]
    err = [
        [max(0.0, 100 * (results[n]["success_rate"] - results[n]["ci_low"])) for n in names],
        [max(0.0, 100 * (results[n]["ci_high"] - results[n]["success_rate"])) for n in names],
    ]
    ax.bar(range(len(names)), rates, yerr=err, capsize=3, color=[color[n] for n in names])
    for i, n in enumerate(names):
        ax.annotate(f"Tr(HΣ)={results[n]['tr_HS']:.2f}", (i, 100 * results[n]["ci_high"]),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6.5)  # fmt: skip
    ax.set_xticks(
        range(len(names)), [results[n]["label"] for n in names], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("success rate (%) ± 95% Wilson CI")
    ax.set_title(f"reaching the flat minimum in {results[names[0]]['runs']} runs")
    ax.set_ylim(0, max(100 * max(results[n]["ci_high"] for n in names) + 12, 10))
    return save_figure(fig, run_dir / "toy_success")


def plot(run_dir: str | Path) -> list[Path]:
    """Draw ``toy_trajectories`` and ``toy_success`` (PNG + SVG) into the run directory.

    Args:
        run_dir: a directory written by :func:`sgdnoise.experiments.toy.run`.

    Returns:
        The paths written.

    Raises:
        FileNotFoundError: a file of the run is missing (the message says how to make it).
    """
    rd = Path(run_dir)
    results = read_json(rd, "results.json", "toy")
    color = colors(list(results))
    return _trajectories(rd, results, color) + _success(rd, results, color)
