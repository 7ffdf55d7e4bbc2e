"""The FashionMNIST figures as a reader sees them (issue 14, item 9): legends list only what was
drawn and sit outside the data, Tr(HΣ̄) is drawn distinctly, sharpness is a curve, seed bands."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.collections import PolyCollection

import sgdnoise.figures.fashion
import sgdnoise.figures.indicator
import sgdnoise.figures.prop1
import sgdnoise.figures.toy
from fake_fashion import write_fashion
from sgdnoise.experiments import fashion


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two small runs (one and two seeds) with the indicator measured along SGD only."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("figures")
    data = write_fashion(base / "data", n_train=40, n_test=40)
    out = {}
    try:
        for seeds in ((0,), (0, 1)):
            cfg = dataclasses.replace(
                fashion.PRESETS["smoke"],
                dynamics=("gd", "sgd", "gld_const"),
                seeds=seeds,
                n_train=30, n_clean=25, n_test=40, batch_size=10,
                gd_iterations=4, iterations=8, checkpoint_every=4,
                gd_eval_every=2, eval_every=2, gd_sharpness_every=2, sharpness_every=2,
                sharpness_draws=3, gd_indicator_every=2, indicator_every=4,
                indicator_samples=2, indicator_trace_matvecs=4,
            )  # fmt: skip
            out[len(seeds)] = base / f"seeds{len(seeds)}"
            fashion.run(cfg, out[len(seeds)], device="cpu", data_dir=data, progress=False)
    finally:
        torch.set_num_threads(old)
    return out


def _figures(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Redraw the figures of ``path``, keeping each matplotlib figure (name → figure)."""
    figs: dict[str, Any] = {}
    real = sgdnoise.figures.fashion.save_figure

    def keep(fig: Any, stem: Any) -> list[Path]:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        fig._test_boxes = {  # measured now: saving closes the figure
            id(ax): (
                ax.get_legend().get_window_extent(renderer) if ax.get_legend() else None,
                ax.get_window_extent(renderer),
            )
            for ax in fig.axes
        }
        figs[Path(stem).name] = fig
        return real(fig, stem)

    monkeypatch.setattr(sgdnoise.figures.fashion, "save_figure", keep)
    sgdnoise.figures.fashion.plot(path)
    return figs


def _legend_outside_data(fig: Any, ax: Any) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    box = fig._test_boxes[id(ax)][0]
    for a in fig.axes:
        assert not box.overlaps(fig._test_boxes[id(a)][1]), "the legend covers an axes"
    return [t.get_text() for t in legend.get_texts()]


def test_fig4_legend_lists_only_measured_dynamics_outside_the_data(
    runs: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fig = _figures(runs[1], monkeypatch)["fig4_indicator"]
    ax = fig.axes[0]
    labels = _legend_outside_data(fig, ax)
    assert labels == [
        r"GD phase: Tr$(H\Sigma)$",
        r"GD phase: Tr$(H\bar{\Sigma})$, isotropic",
        r"SGD: Tr$(H\Sigma)$",
        r"SGD: Tr$(H\bar{\Sigma})$, isotropic",
    ]
    title = ax.get_title()
    assert "((" not in title and "))" not in title
    assert title.count("(") == title.count(")")
    # Tr(HΣ̄) is visibly distinct: dotted with open markers, Tr(HΣ) solid with filled ones.
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: (data line, ...)
    solid, dotted = lines[r"SGD: Tr$(H\Sigma)$"], lines[r"SGD: Tr$(H\bar{\Sigma})$, isotropic"]
    assert solid.get_linestyle() == "-" and dotted.get_linestyle() == ":"
    assert dotted.get_markerfacecolor() != solid.get_markerfacecolor()


def test_fig2_sharpness_is_a_curve_over_every_measured_point(
    runs: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    res = json.loads((runs[1] / "results.json").read_text())
    fig = _figures(runs[1], monkeypatch)["fig2_sharpness"]
    ax = fig.axes[0]
    sgd = next(c.lines[0] for c in ax.containers if c.get_label() == "SGD")
    x = list(sgd.get_xdata())
    assert x == res["sgd"]["curves"]["sharpness_signed"]["iteration"]
    assert len(x) == 5 and x[0] == 4 and sgd.get_linestyle() == "-"  # t = 0, 2, 4, 6, 8
    _legend_outside_data(fig, fig.axes[1])


def test_quick_profile_measures_sharpness_at_six_or_more_points_after_the_switch() -> None:
    quick = fashion.PRESETS["quick"]
    points = [t for t in range(1, quick.iterations + 1) if t % quick.sharpness_every == 0]
    points += [] if quick.iterations in points else [quick.iterations]
    assert len(points) >= 6


@pytest.mark.parametrize(("seeds", "band", "note"), [(1, False, "single seed, no band"),
                                                     (2, True, "mean ± std over 2 seeds")])  # fmt: skip
def test_fig2_left_has_a_seed_band_when_more_than_one_seed_ran(
    runs: dict[int, Path], monkeypatch: pytest.MonkeyPatch, seeds: int, band: bool, note: str
) -> None:
    fig = _figures(runs[seeds], monkeypatch)["fig2_test_acc"]
    ax = fig.axes[0]
    assert note in ax.get_title()
    has_band = any(isinstance(c, PolyCollection) for c in ax.collections)
    assert has_band == band
    _legend_outside_data(fig, ax)


def test_fig4_draws_and_lists_no_series_without_a_positive_estimate(
    runs: dict[int, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    res = json.loads((runs[1] / "results.json").read_text())
    for curves in (res["gd_phase"]["curves"], res["sgd"]["curves"]):
        iso = curves["tr_HS_iso"]
        iso["mean"] = [-abs(v) - 1e-3 for v in iso["mean"]]  # negative Hutch++ estimates
    (tmp_path / "results.json").write_text(json.dumps(res))
    fig = _figures(tmp_path, monkeypatch)["fig4_indicator"]
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [r"GD phase: Tr$(H\Sigma)$", r"SGD: Tr$(H\Sigma)$"]
    n = len(res["gd_phase"]["curves"]["tr_HS_iso"]["mean"]) + len(
        res["sgd"]["curves"]["tr_HS_iso"]["mean"]
    )
    assert any(f"{n} estimate(s) ≤ 0 not drawn" in t.get_text() for t in ax.texts)
