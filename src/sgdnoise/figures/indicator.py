"""Figures of ``sgdnoise indicator`` (poster Fig. 4 left; Proposition 2), from a run directory.

``plot(run_dir)`` reads what the run wrote — ``results.json`` (per width), ``analysis.json`` (the
log-log slope and the δ sweep) and ``config.json`` (b and δ for the labels) — and recomputes
nothing. matplotlib is imported inside the functions only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..runs import RunDir
from ._style import save_figure

__all__ = ["band", "colors", "plain_log_ticks", "plot", "pm", "summary", "summary_markdown"]

SIGMA_BAR = "$\\bar{\\Sigma}$"


def band(ax: Any, x: list[int], mean: list[Any], std: list[Any], color: Any, **kw: Any) -> None:
    """Plot a mean curve with a ±1 std band (``None`` entries: a gap / no band).

    The band's lower edge falls back to the mean where ``mean − std ≤ 0`` (keeps log axes valid).
    """
    import numpy as np

    m = np.array([np.nan if v is None else v for v in mean], dtype=float)
    s = np.array([0.0 if v is None else v for v in std], dtype=float)
    ax.plot(x, m, color=color, **kw)
    if np.any(s > 0):
        lo = np.where(m - s > 0, m - s, m)
        ax.fill_between(x, lo, m + s, color=color, alpha=0.15, linewidth=0)


def plain_log_ticks(ax: Any, which: str = "y") -> None:
    """Plain ``%g`` tick labels on a log axis (``which``: ``"x"`` or ``"y"``), at 1-2-5 steps when
    it spans under two decades (the default mathtext labels take seconds to lay out on a busy
    CPU). Call after plotting."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 100:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def colors(n: int, cmap: str = "viridis") -> list[Any]:
    """``n`` colours spread over 10–85 % of a matplotlib colormap."""
    import matplotlib.pyplot as plt

    return list(plt.get_cmap(cmap)([0.1 + 0.75 * i / max(1, n - 1) for i in range(n)]))


def _finish(ax: Any, xlabel: str, ylabel: str, *, log: str = "", fontsize: int = 8) -> None:
    for which in log:
        getattr(ax, f"set_{which}scale")("log")
        plain_log_ticks(ax, which)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log else "major")


def _indicator(results: dict[str, Any], config: dict[str, Any], stem: Path) -> list[Path]:
    """Poster Fig. 4 left: Tr(HΣ) solid, Tr(HΣ̄) dotted, log scale."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for w, c in zip(results, colors(len(results)), strict=True):
        cv = results[w]["curves"]
        band(
            ax, cv["epoch"], cv["tr_HS_mean"], cv["tr_HS_std"], c, lw=1.8, label=f"h = {w}: Tr(HΣ)"
        )
        band(ax, cv["epoch"], cv["tr_HS_iso_mean"], cv["tr_HS_iso_std"], c, lw=1.8, ls=":",
             label=f"h = {w}: Tr(H{SIGMA_BAR})")  # fmt: skip
    b = config.get("batch_size", config.get("noise_batch_size", 10))
    _finish(ax, "epoch", f"escape indicator (Σ for batch size {b})", log="y")
    ax.set_title("SGD noise vs isotropic equivalent, one hidden layer")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, stem)


def _ratio(results: dict[str, Any], analysis: dict[str, Any], stem: Path) -> list[Path]:
    """The ratio along training (left) and its final value against D (right)."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for w, c in zip(results, colors(len(results)), strict=True):
        cv = results[w]["curves"]
        band(a1, cv["epoch"], cv["ratio_mean"], cv["ratio_std"], c, lw=1.8, label=f"h = {w}")
    _finish(a1, "epoch", f"Tr(HΣ) / Tr(H{SIGMA_BAR})", log="y")
    a1.legend(fontsize=8)
    dims = [r["dim"] for r in results.values()]
    errs = [r["ratio_final_std"] or 0.0 for r in results.values()]
    a2.errorbar(dims, [r["ratio_final"] for r in results.values()], yerr=errs, fmt="o-",
                color="k", capsize=3, label="final ratio")  # fmt: skip
    _finish(a2, "D = 3h", f"final Tr(HΣ) / Tr(H{SIGMA_BAR})", log="xy")
    slope = analysis.get("ratio_vs_dim_loglog_slope")
    a2.set_title("" if slope is None else f"log-log slope {slope:.2f}")
    fig.tight_layout()
    return save_figure(fig, stem)


def _alignment_vs_delta(ax: Any, sweep: dict[str, Any]) -> None:
    """Final a, its minimum over training and the bound r²_min/r²_max against δ."""
    dv = [float(d) for d in sweep]
    rows = list(sweep.values())
    ax.errorbar(dv, [r["alignment_final"] for r in rows],
                yerr=[r["alignment_final_std"] or 0.0 for r in rows], fmt="o-", capsize=3,
                label="a (final)")  # fmt: skip
    ax.plot(dv, [r["alignment_min"] for r in rows], "s--", label="min a over training")
    ax.plot(dv, [r["a_bound_final"] for r in rows], "^:", label="bound r²_min/r²_max (final)")
    ax.plot(dv, [d * d for d in dv], color="gray", lw=0.8, label="δ² (the bound for r_max ≤ 1)")
    _finish(ax, "δ", "alignment coefficient", log="xy")
    ax.legend(fontsize=7)


def _alignment(
    results: dict[str, Any], analysis: dict[str, Any], config: dict[str, Any], stem: Path
) -> list[Path]:
    """Proposition 2: a along training (widths), a along training (δ), final a against δ."""
    import matplotlib.pyplot as plt

    sweep = analysis.get("delta_sweep") or {}
    ncols = 3 if sweep else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.8), squeeze=False)
    panels = [(axes[0, 0], results, "h", f"alignment along training (δ = {config.get('delta')})")]
    if sweep:
        title = f"alignment vs δ (h = {analysis.get('delta_sweep_width')})"
        panels.append((axes[0, 1], sweep, "δ", title))
    for i, (ax, groups, sym, title) in enumerate(panels):
        for key, c in zip(groups, colors(len(groups), "plasma" if i else "viridis"), strict=True):
            cv = groups[key]["curves"]
            band(ax, cv["epoch"], cv["alignment_mean"], cv["alignment_std"], c, lw=1.8,
                 label=f"{sym} = {key}")  # fmt: skip
        ax.set_ylim(bottom=0)
        _finish(ax, "epoch", "a" if i else "a = u₁ᵀΣu₁ · Tr H / (λ₁ Tr Σ)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    if sweep:
        _alignment_vs_delta(axes[0, 2], sweep)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot(run_dir: str | Path) -> list[Path]:
    """Draw the figures of an indicator run directory from its saved results (no recomputation).

    Args:
        run_dir: a directory written by :func:`sgdnoise.experiments.indicator.run`.

    Returns:
        The written files: ``indicator`` (poster Fig. 4 left), ``indicator_ratio`` and
        ``prop2_alignment``, each as PNG and SVG.

    Raises:
        FileNotFoundError: if ``results.json`` or ``config.json`` is missing.
        ModuleNotFoundError: without matplotlib (``pip install sgdnoise[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    rd = RunDir(run_dir)
    raw = rd.read_json("results.json")
    results = {w: raw[w] for w in sorted(raw, key=int)}
    analysis = rd.read_json("analysis.json") if rd.exists("analysis.json") else {}
    config = rd.read_json("config.json")
    return [
        *_indicator(results, config, rd / "indicator"),
        *_ratio(results, analysis, rd / "indicator_ratio"),
        *_alignment(results, analysis, config, rd / "prop2_alignment"),
    ]


def pm(mean: float, std: float | None, fmt: str = ".3g") -> str:
    """``mean ± std`` (``n/a`` for a missing or non-finite mean; no ``±`` without a std)."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


def summary(results: dict[str, Any]) -> str:
    """The short table printed at the end of a run: one line per width.

    Args:
        results: what :func:`run` returned (``results.json``).

    Returns:
        Lines ``h = … (D = …): Tr(HΣ)/Tr(HΣ̄) = mean ± std, a = …, train acc …``.
    """
    return "\n".join(
        f"h = {w:>4} (D = {r['dim']:>5}): Tr(HΣ)/Tr(HΣ̄) = "
        f"{pm(r['ratio_final'], r['ratio_final_std'])}, a = "
        f"{pm(r['alignment_final'], r['alignment_final_std'])}, "
        f"train acc {r['train_accuracy_final']:.3f}"
        for w, r in results.items()
    )


def _dead_notes(groups: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    for name, r in groups.items():
        for s in r["seeds_dead"]:
            since = r["dead_since_epoch"][str(s)]
            notes.append(
                f"- {name}, seed {s}: every output clipped from epoch {since} on (zero gradient, "
                f"H = 0, ratio undefined; final train accuracy "
                f"{r['dead_train_accuracy_final'][r['seeds_dead'].index(s)]:.3f}); left out of "
                "the means."
            )
    redrawn = [
        f"{name} seed {s} ({k}×)"
        for name, r in groups.items()
        for s, k in zip(r["seeds"], r["init_redraws_per_seed"], strict=True)
        if k
    ]
    if redrawn:
        notes.append(
            "- Dead initialisations redrawn (all outputs clipped at init): " + ", ".join(redrawn)
        )
    return (["", "Dead networks (the clip's zero gradient can switch every sample off):", *notes]
            if notes else [])  # fmt: skip


def summary_markdown(
    config: dict[str, Any], results: dict[str, Any], analysis: dict[str, Any], meta: dict[str, Any]
) -> str:
    """The text of an indicator run's ``summary.md``.

    Args:
        config: the run's ``config.json``. results, analysis, meta: its ``results.json``,
            ``analysis.json`` and ``meta.json``.

    Returns:
        Markdown: the width table, the log-log slope, the δ sweep, the Hessian check, timings.
    """
    opt = "Adam" if config["optimizer"] == "adam" else "SGD"
    batch = (
        "full batch"
        if config["train_batch_size"] is None
        else f"batch {config['train_batch_size']}"
    )
    lines = [
        "# Escape indicator on one-hidden-layer networks (poster Fig. 4 left)",
        "",
        f"{opt} ({batch}), lr {config['lr']:g}, {config['epochs']} epochs × {config['steps_per_epoch']} "
        f"steps (lr decays linearly over the last {config['decay_epochs']}), δ = {config['delta']:g}, "
        f"N = {config['num_points']}, seeds {list(config['seeds'])}. Σ is the exact covariance of a "
        f"mini-batch gradient of b = {config.get('batch_size', config.get('noise_batch_size'))} samples drawn "
        f"{'with' if config['replacement'] else 'without'} replacement; the ratio and a do not "
        f"depend on b. Measured in {config['measure_dtype']}; Tr(H) exact. Mean ± sample std over "
        "the live seeds at the final epoch.",
        "",
        "| h | D | Tr(HΣ)/Tr(HΣ̄) | ratio / D | Tr(HΣ) | Tr(HΣ̄) | a | min a (training) "
        "| train loss | train acc | live seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in config["widths"]:
        r = results[str(w)]
        lines.append(
            f"| {w} | {r['dim']} | {pm(r['ratio_final'], r['ratio_final_std'])} | "
            f"{r['ratio_over_dim_final']:.3f} | {pm(r['tr_HS_final'], r['tr_HS_final_std'])} | "
            f"{pm(r['tr_HS_iso_final'], r['tr_HS_iso_final_std'])} | "
            f"{pm(r['alignment_final'], r['alignment_final_std'])} | "
            f"{r['alignment_min']:.3g} | "
            f"{pm(r['train_loss_final'], r['train_loss_final_std'])} | "
            f"{pm(r['train_accuracy_final'], r['train_accuracy_final_std'])} | "
            f"{r['num_valid_final']}/{len(r['seeds'])} |"
        )
    lines += _dead_notes({f"h = {w}": results[str(w)] for w in config["widths"]})
    slope = analysis["ratio_vs_dim_loglog_slope"]
    lines += [
        "",
        "Log-log slope of the final ratio against D: "
        + ("n/a (one width)" if slope is None else f"{slope:.3f}")
        + " (a ratio ∝ D gives 1). A re-simulation of the released script gave "
        "about 0.4·D (≈ 40 / 170 / 650 for D = 96 / 384 / 1536); the paper states no number.",
    ]
    lines += _sweep_md(analysis)
    checks = [results[str(w)]["hessian_check_max_rel_err"] for w in config["widths"]]
    checks = [c for c in checks if c is not None]
    if checks:
        lines += [
            "",
            f"Closed-form Hessian (2/N)JᵀJ vs double-backward products: max relative error "
            f"{max(checks):.1e} over {config['hessian_check_vectors']} random vectors at the first "
            "and last measurement of every run.",
        ]
    lines += [
        "",
        f"Wall time: {meta['seconds']:.1f} s on {meta['device']}, computing "
        f"{meta['runs_computed']} of {meta['runs_total']} training runs (the others were kept "
        "from an earlier, identical run in this directory).",
        "",
    ]
    return "\n".join(lines)


def _sweep_md(analysis: dict[str, Any]) -> list[str]:
    """The δ-sweep table of ``summary.md`` (Proposition 2; empty without a sweep)."""
    if not analysis["delta_sweep"]:
        return []
    lines = [
        "",
        f"## Proposition 2: a(θ) against δ (h = {analysis['delta_sweep_width']})",
        "",
        "a = u₁ᵀΣu₁·Tr H/(λ₁ Tr Σ); the bound r_min²/r_max² (unclipped residuals, ≥ δ²/r_max²) "
        "is what Proposition 2's argument guarantees for the uncentred second moment.",
        "",
        "| δ | a (final) | min a over training | bound r_min²/r_max² (final) | unclipped "
        "fraction | train loss | ratio | live seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, r in analysis["delta_sweep"].items():
        lines.append(
            f"| {d} | {pm(r['alignment_final'], r['alignment_final_std'])} | "
            f"{r['alignment_min']:.3g} | {pm(r['a_bound_final'], r['a_bound_final_std'])} | "
            f"{pm(r['frac_active_final'], r['frac_active_final_std'])} | "
            f"{pm(r['train_loss_final'], r['train_loss_final_std'])} | "
            f"{pm(r['ratio_final'], r['ratio_final_std'])} | "
            f"{r['num_valid_final']}/{len(r['seeds'])} |"
        )
    lines += _dead_notes({f"δ = {d}": r for d, r in analysis["delta_sweep"].items()})
    return lines
