"""The progress bar's ETA weights steps by their cost (issue 14, item 10). A fake clock drives
time, so nothing here depends on the machine's speed."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from sgdnoise.experiments import fashion, fashion_run
from sgdnoise.experiments.fashion_run import phase_cost
from sgdnoise.runs import Progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_weights_each_remaining_step_by_its_cost() -> None:
    # Phase A: 100 steps of cost 1 (0.1 s each); phase B: 100 steps of cost 6 (0.6 s each).
    clock = FakeClock()
    bar = Progress(200, "x", enabled=False, work_total=100 * 1 + 100 * 6, clock=clock)
    truth = 100 * 0.1 + 100 * 0.6
    for _ in range(50):
        clock.t += 0.1
        bar.update(1, work=1.0)
    assert bar.eta() == pytest.approx(truth - clock.t)  # 65 s; counting steps would say 15 s
    for _ in range(100):
        clock.t += 0.1 if bar.count < 100 else 0.6
        bar.update(1, work=1.0 if bar.count < 100 else 6.0)
    assert bar.eta() == pytest.approx(truth - clock.t)


def test_loaded_steps_shorten_the_work_but_do_not_speed_up_the_rate() -> None:
    clock = FakeClock()
    bar = Progress(300, "x", enabled=False, work_total=300, clock=clock)
    bar.skip(200, work=200)  # a finished phase, loaded in no time
    assert bar.eta() != bar.eta()  # nothing computed yet: unknown (NaN), not 0
    for _ in range(10):
        clock.t += 2.0
        bar.update(1)
    assert bar.eta() == pytest.approx(90 * 2.0)


def test_the_line_shows_the_share_of_work_not_of_steps() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    bar = Progress(20, "fashion", stream=stream, min_interval=0, work_total=70, clock=clock)
    clock.t = 1.0
    bar.update(10, work=10)  # 10 cheap steps of 20, but 1/7 of the work
    line = stream.getvalue().splitlines()[-1]
    assert "14% (step 10/20)" in line and "ETA 6s" in line


def test_fashion_phase_costs_follow_the_benchmark() -> None:
    quick = fashion.PRESETS["quick"]
    per_step = {d: phase_cost(quick, d) / quick.iterations for d in quick.dynamics}
    gd_phase = phase_cost(quick, "gd_phase") / quick.gd_iterations
    # bench_fashion_steps: a GLD Hessian step costs about six GD steps, 1st eigvec about three
    # (the step alone: every dynamics shares the same measurements, in per_step["gd"] − 1).
    step = {d: c - (per_step["gd"] - 1.0) for d, c in per_step.items()}
    assert 5.0 <= step["gld_hessian"] <= 7.0
    assert 2.5 <= step["gld_hessian_top1"] <= 3.5
    assert 1.4 <= step["gld_diag"] <= 1.9
    assert per_step["sgd"] < per_step["gd"] == pytest.approx(gd_phase, rel=0.1)
    # The whole quick profile: 45–60 min at the measured 0.12–0.135 s per GD step.
    total = phase_cost(quick, "gd_phase") + sum(phase_cost(quick, d) for d in quick.dynamics)
    assert 45 * 60 <= total * 0.125 <= 60 * 60


def _record_bars(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Progress]:
    """Every progress bar ``module`` creates, in order (its ``Progress`` patched to keep them)."""
    bars: list[Progress] = []

    class Keep(Progress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(module, "Progress", Keep)
    return bars


def test_fashion_counts_exactly_the_work_it_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps and measurements add up to the bar's total, computed or loaded (no ETA of 0 at 60%)."""
    from fake_fashion import write_fashion
    from test_runs import SMALL

    bars = _record_bars(monkeypatch, fashion_run)
    cfg = dataclasses.replace(SMALL, gd_sharpness_every=3, sharpness_every=3, indicator_every=3)
    data = write_fashion(tmp_path / "data", n_train=40, n_test=40)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stop in (3, None, None):  # interrupted, resumed, then loaded from final.pt
            fashion.run(cfg, tmp_path / "run", device="cpu", data_dir=data, progress=False,
                        _stop_after=stop)  # fmt: skip
    finally:
        torch.set_num_threads(old)
    first, resumed, loaded = bars
    assert first.work_done < first.work_total
    for bar in (resumed, loaded):
        assert bar.work_done == pytest.approx(bar.work_total)
    assert loaded.work_run == 0.0  # nothing computed: no rate, the ETA is unknown, never 0 s/unit


def test_indicator_weights_each_training_run_by_its_width(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sgdnoise.experiments import indicator

    bars = _record_bars(monkeypatch, indicator)
    cfg = dataclasses.replace(indicator.PRESETS["smoke"], delta_sweep=())
    for _ in range(2):  # computed, then every run kept
        indicator.run(cfg, tmp_path, progress=False)
    computed, kept = bars
    assert computed.work_total == len(cfg.seeds) * sum(cfg.widths)
    assert computed.work_run == computed.work_done == computed.work_total
    assert kept.work_done == kept.work_total and kept.work_run == 0.0
