"""Figures of the FashionMNIST experiment (poster Fig. 2 and Fig. 4 right), from ``results.json``.

Every figure is drawn from the curves and ``meta`` that :func:`sgdnoise.experiments.fashion.run`
stores in ``results.json``; nothing is recomputed. Legends list only what was drawn and sit
outside the axes. :func:`summary` renders the same results as the run's ``summary.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._style import band, colors, legend_outside, pyplot, read_json, save_figure

__all__ = ["plot", "summary"]


def _seed_note(meta: Mapping[str, Any]) -> str:
    n = len(meta.get("seeds", []))
    return "single seed, no band" if n <= 1 else f"mean ± std over {n} seeds"


def _test_acc(rd: Path, res: Mapping[str, Any], color: Mapping[str, Any]) -> list[Path]:
    """``fig2_test_acc``: test accuracy vs iteration, the switch as a dashed line."""
    meta = res["meta"]
    switch, gd_curves = meta["switch_iteration"], res["gd_phase"]["curves"]
    fig, ax = pyplot().subplots(figsize=(8.6, 4.5))
    if "test_acc" in gd_curves:
        band(ax, gd_curves["test_acc"], f"GD phase (lr {meta['gd_lr']:g})", color="black")
    for dyn in meta["dynamics"]:
        c = res[dyn]["curves"].get("test_acc")
        if c:
            band(ax, c, res[dyn]["label"], color=color[dyn])
    ax.axvline(switch, ls="--", color="grey", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"FashionMNIST (corrupted labels): test accuracy, switch at {switch} ({_seed_note(meta)})",
        fontsize=10,
    )
    legend_outside(ax, fontsize=7)
    return save_figure(fig, rd / "fig2_test_acc")


def _sharpness(rd: Path, res: Mapping[str, Any], color: Mapping[str, Any]) -> list[Path]:
    """``fig2_sharpness``: expected sharpness (signed, absolute) vs iteration, ± 1 s.e."""
    meta = res["meta"]
    gd_curves = res["gd_phase"]["curves"]
    fig, axes = pyplot().subplots(1, 2, figsize=(12.5, 4.2))
    for ax, key, title in (
        (axes[0], "sharpness_signed", "E[L(θ+ν)] − L(θ) (poster)"),
        (axes[1], "sharpness_abs", "E|L(θ+ν) − L(θ)| (released code)"),
    ):
        series = [("GD phase", gd_curves.get(key), "black")]
        series += [(res[d]["label"], res[d]["curves"].get(key), color[d]) for d in meta["dynamics"]]
        for label, c, col in series:
            if c:
                ax.errorbar(c["iteration"], c["mean"], yerr=c.get("stderr"), color=col, ls="-",
                            lw=1.2, marker="o", ms=3, capsize=2, label=label)  # fmt: skip
        ax.axvline(meta["switch_iteration"], ls="--", color="grey", lw=1)
        ax.set_xlabel("iteration")
        ax.set_title(
            f"{title}, σ = {meta['sharpness']['sigma']}, {meta['sharpness']['draws']} draws "
            "(bars: ± 1 s.e.)",
            fontsize=9,
        )
    axes[0].set_ylabel("expected sharpness")
    legend_outside(axes[1], fontsize=7)
    return save_figure(fig, rd / "fig2_sharpness")


def _indicator_series(res: Mapping[str, Any], color: Mapping[str, Any]) -> list[tuple]:
    """(label, curves, colour) of the GD phase and of every dynamics the indicator followed."""
    meta = res["meta"]
    switch = meta["switch_iteration"]
    measured = meta.get("indicator_dynamics")
    if measured is None:  # results written before the field existed: curves beyond the switch
        measured = [
            d
            for d in meta["dynamics"]
            if any(it > switch for it in res[d]["curves"].get("tr_HS", {}).get("iteration", []))
        ]
    series: list[tuple] = [("GD phase", res["gd_phase"]["curves"], "black")]
    series += [
        (res[d]["label"], res[d]["curves"], color[d]) for d in meta["dynamics"] if d in measured
    ]
    return series


def _indicator(rd: Path, res: Mapping[str, Any], color: Mapping[str, Any]) -> list[Path]:
    """``fig4_indicator``: Tr(HΣ) (solid) and Tr(HΣ̄) (dotted) on a log scale; estimates ≤ 0
    cannot be drawn there and are counted in a note."""
    meta = res["meta"]
    fig, ax = pyplot().subplots(figsize=(8.6, 4.5))
    hidden = 0
    for label, curves, col in _indicator_series(res, color):
        if "tr_HS" not in curves:
            continue
        for key, ls, face, name in (
            ("tr_HS", "-", col, r"Tr$(H\Sigma)$"),
            ("tr_HS_iso", ":", "white", r"Tr$(H\bar{\Sigma})$, isotropic"),
        ):
            c = curves.get(key)
            if not c:
                continue
            x, m = c["iteration"], c["mean"]
            hidden += sum(1 for v in m if v is None or not v > 0)
            if not any(v is not None and v > 0 for v in m):
                continue  # nothing drawable on the log scale: no line, no legend entry
            ax.errorbar(x, m, yerr=c.get("stderr"), color=col, ls=ls, lw=1.4, marker="o",
                        ms=4, mfc=face, mec=col, capsize=2, label=f"{label}: {name}")  # fmt: skip
    ax.axvline(meta["switch_iteration"], ls="--", color="grey", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("escape indicator")
    ind = meta["indicator"]
    kind = "exact" if ind["exact_tr_HS"] else f"sampled over {ind['samples']} examples"
    ax.set_title(
        rf"Tr$(H\Sigma)$ vs Tr$(H\bar{{\Sigma}})$: $\Sigma$ of a mini-batch of "
        f"{ind['batch_size']}, {kind}",
        fontsize=10,
    )
    if hidden:
        ax.text(0.01, 0.01, f"{hidden} estimate(s) ≤ 0 not drawn (log scale)",
                transform=ax.transAxes, fontsize=7, color="darkred")  # fmt: skip
    legend_outside(ax, fontsize=7)
    return save_figure(fig, rd / "fig4_indicator")


def plot(run_dir: str | Path) -> list[Path]:
    """Draw the figures of a finished run from its ``results.json`` (no recomputation).

    * ``fig2_test_acc`` — test accuracy vs iteration, the switch as a dashed line (poster Fig. 2
      left); a band of ± one std over seeds when more than one seed ran (the title says which);
    * ``fig2_sharpness`` — expected sharpness (signed and absolute) vs iteration, as curves over
      every point the run measured, with Monte-Carlo standard errors (Fig. 2 right);
    * ``fig4_indicator`` — Tr(HΣ) (solid, filled markers) and Tr(HΣ̄) (dotted, open markers) along
      the GD phase and along the dynamics where the run measured it (Fig. 4 right).

    Args:
        run_dir: a directory written by :func:`sgdnoise.experiments.fashion.run`.

    Returns:
        The paths written (PNG + SVG per figure).

    Raises:
        FileNotFoundError: ``results.json`` is missing.
    """
    rd = Path(run_dir)
    res = read_json(rd, "results.json", "fashion")
    color = colors(list(res["meta"]["dynamics"]))
    return _test_acc(rd, res, color) + _sharpness(rd, res, color) + _indicator(rd, res, color)


def _fmt(st: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not st or st.get("mean") is None:
        return "—"
    m = st["mean"]
    s = st.get("std")
    fmt = f"{{:.{digits}f}}" if abs(m) >= 1e-3 or m == 0 else f"{{:.{digits}g}}"
    return fmt.format(m) + (" ± " + fmt.format(s) if s is not None else "")


def _ratio_text(gd: Mapping[str, Any]) -> str:
    """The indicator ratio, unless an estimate ≤ 0 makes it meaningless (then say why)."""
    iso = (gd.get("tr_HS_iso") or {}).get("values") or []
    hs = (gd.get("tr_HS") or {}).get("values") or []
    if any(v is not None and v <= 0 for v in iso):
        return "ratio not measurable: the Hutch++ estimate of Tr H, hence of Tr(HΣ̄), is ≤ 0"
    if any(v is not None and v <= 0 for v in hs):
        return "ratio not measurable: the estimate of Tr(HΣ) is ≤ 0"
    return f"ratio {_fmt(gd.get('indicator_ratio'), 1)}"


def summary(results: Mapping[str, Any]) -> str:
    """The short summary printed at the end and saved as ``summary.md`` (Markdown tables of
    mean ± std over seeds)."""
    meta = results["meta"]
    gd = results["gd_phase"]
    lines = [
        f"# FashionMNIST with corrupted labels — profile `{meta['profile']}`",
        "",
        f"Seeds {meta['seeds']} (mean ± sample std; one seed shows the value only). "
        f"Switch at iteration {meta['switch_iteration']} (GD lr {meta['gd_lr']}, then lr "
        f"{meta['lr_after_switch']} for every dynamics, GD included). Training set "
        f"{meta['n_train']} = {meta['n_clean']} clean + {meta['n_train'] - meta['n_clean']} random "
        f"labels; {meta['n_test']} test images. Sharpness: σ = {meta['sharpness']['sigma']}, "
        f"{meta['sharpness']['draws']} draws.",
        "",
        "## θ*_GD (end of the GD phase)",
        "",
        f"- test accuracy {_fmt(gd['test_acc'])} (paper's figure ≈ 0.66; re-implementations ≈ 0.70)",
        f"- train accuracy: clean {_fmt(gd['train_acc_clean'])}, corrupted (random labels) "
        f"{_fmt(gd['train_acc_corrupted'])}",
        f"- expected sharpness signed {_fmt(gd['sharpness_signed'], 4)}, absolute "
        f"{_fmt(gd['sharpness_abs'], 4)}",
        f"- Tr(HΣ) {_fmt(gd['tr_HS'], 4)} vs Tr(HΣ̄) {_fmt(gd['tr_HS_iso'], 4)} ({_ratio_text(gd)})",
        f"- wall time {_fmt(gd['wall_s'], 0)} s",
        "",
        "## After the switch",
        "",
        "| dynamics | final test acc | max test acc | train acc clean | train acc corrupted | "
        "sharpness (signed) | sharpness (abs) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dyn in meta["dynamics"]:
        e = results[dyn]
        lines.append(
            f"| {e['label']} | {_fmt(e['final_test_acc'])} | {_fmt(e['max_test_acc'])} | "
            f"{_fmt(e['final_train_acc_clean'])} | {_fmt(e['final_train_acc_corrupted'])} | "
            f"{_fmt(e['sharpness_signed'], 4)} | {_fmt(e['sharpness_abs'], 4)} | "
            f"{_fmt(e['seconds_per_step'], 3)} |"
        )
    lines.append("")
    return "\n".join(lines)
