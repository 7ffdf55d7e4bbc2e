"""Tests of the FashionMNIST experiment (smoke profile on the real data; Debian's package in CI)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sgdnoise.data import DataNotFoundError, find_fashion_mnist
from sgdnoise.experiments import fashion
from sgdnoise.experiments.fashion import ALL_DYNAMICS, config_from, run, validate
from sgdnoise.experiments.fashion_run import derive_seed, load_final
from sgdnoise.figures.fashion import plot

try:
    find_fashion_mnist()
    HAVE_DATA = True
except DataNotFoundError:  # pragma: no cover - CI installs dataset-fashion-mnist
    HAVE_DATA = False

needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="FashionMNIST not installed (apt-get install dataset-fashion-mnist)"
)

RESULT_KEYS = ("final_test_acc", "max_test_acc", "sharpness_signed", "sharpness_abs", "curves")


# --------------------------------------------------------------------------------------------
# Configuration (no data needed)
# --------------------------------------------------------------------------------------------


def test_presets_are_valid_and_keep_the_protocol():
    for name, cfg in fashion.PRESETS.items():
        validate(cfg)
        assert cfg.profile == name
        assert cfg.dynamics == ALL_DYNAMICS
    quick, paper = fashion.PRESETS["quick"], fashion.PRESETS["paper"]
    for cfg in (quick, paper):
        assert (cfg.n_train, cfg.n_clean, cfg.n_test) == (1200, 1000, None)
        assert (cfg.gd_lr, cfg.gd_iterations, cfg.lr, cfg.batch_size) == (0.1, 3000, 0.07, 20)
        assert cfg.k == 20 and cfg.const_sigma == 1e-3 and cfg.sharpness_sigma == 0.01
    assert quick.iterations == 1000 and quick.seeds == (0,)
    assert paper.iterations == 15000 and len(paper.seeds) == 3
    assert paper.sharpness_draws == 1000 and paper.indicator_samples is None
    assert paper.refresh_every == fashion.DEFAULT_REFRESH
    assert fashion.DEFAULT_REFRESH["gld_leading"] == fashion.DEFAULT_REFRESH["gld_hessian"] == 10
    for d in ("gld_dynamic", "gld_diag", "gld_hessian_top1"):
        assert fashion.DEFAULT_REFRESH[d] == 1


def test_config_from_layers_toml_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("iterations = 7\nseeds = [3, 4]\n[refresh_every]\ngld_hessian = 5\n")
    from sgdnoise.runs import load_toml_config

    cfg = config_from("smoke", load_toml_config(toml), iterations=9, dynamics=("sgd",))
    assert cfg.iterations == 9  # the flag wins over the file
    assert cfg.seeds == (3, 4)
    assert cfg.dynamics == ("sgd",)
    assert cfg.refresh_every["gld_hessian"] == 5 and cfg.refresh_every["gld_dynamic"] == 1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dynamics": ("gld_bogus",)}, r"dynamics\[0\] must be one of gd, sgd"),
        ({"seeds": (1, 1)}, "seeds must not repeat values"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"n_clean": 5000}, "n_clean must be <= n_train"),
        ({"indicator_samples": 1}, "indicator_samples must be >= 2"),
        ({"refresh_every": {"gld_nope": 2}}, "refresh_every key 'gld_nope' must be one of"),
        ({"bogus_key": 1}, "fashion config: unknown key"),
    ],
)
def test_config_errors_say_what_to_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_from("smoke", None, **overrides)


def test_unknown_profile():
    with pytest.raises(ValueError, match="valid profiles: smoke, quick, paper"):
        config_from("huge")


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "sgd", "dynamics") == derive_seed(0, "sgd", "dynamics")
    assert derive_seed(0, "sgd", "dynamics") != derive_seed(1, "sgd", "dynamics")
    assert derive_seed(0, "sgd", 5, "sharpness") != derive_seed(0, "sgd", 6, "sharpness")
    assert 0 <= derive_seed("x") < 2**63


def test_missing_data_gives_the_how_to_message(tmp_path, capsys):
    cfg = config_from("smoke", dynamics=("gd",))
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        run(cfg, tmp_path / "run", device="cpu", data_dir=tmp_path, progress=False)
    from sgdnoise.cli import main

    code = main(["fashion", "--profile", "smoke", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r2"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_cli_help_lists_the_options():
    from sgdnoise.cli import build_parser

    text = (
        build_parser()
        .parse_args.__self__._subparsers._group_actions[0]
        .choices["fashion"]
        .format_help()
    )
    for flag in (
        "--profile",
        "--dynamics",
        "--seeds",
        "--device",
        "--data-dir",
        "--out",
        "--config",
    ):
        assert flag in text


# --------------------------------------------------------------------------------------------
# The smoke run on the real data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip("FashionMNIST not installed")
    out = tmp_path_factory.mktemp("fashion") / "smoke"
    cfg = config_from("smoke")
    t0 = time.perf_counter()
    results = run(cfg, out, device="cpu", progress=False)
    elapsed = time.perf_counter() - t0
    assert not list(out.glob("*.png")), "run() draws nothing"
    plot(out)
    return out, cfg, results, elapsed


@needs_data
def test_smoke_writes_every_artefact(smoke_run):
    out, cfg, _results, _ = smoke_run
    for name in ("config.json", "env.json", "results.json", "summary.md", "metrics.csv"):
        assert (out / name).exists(), name
    for stem in ("fig2_test_acc", "fig2_sharpness", "fig4_indicator"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()
    on_disk = json.loads((out / "results.json").read_text())
    for dyn in ALL_DYNAMICS:
        for key in RESULT_KEYS:
            assert key in on_disk[dyn], (dyn, key)
        for key in ("final_test_acc", "max_test_acc", "sharpness_signed", "sharpness_abs"):
            st = on_disk[dyn][key]
            assert set(st) >= {"mean", "std"} and math.isfinite(st["mean"]), (dyn, key)
        acc = on_disk[dyn]["curves"]["test_acc"]
        # every curve starts at θ*_GD (the switch) and ends after the last iteration
        assert acc["iteration"][0] == cfg.gd_iterations
        assert acc["iteration"][-1] == cfg.gd_iterations + cfg.iterations
        assert 0.0 <= acc["mean"][-1] <= 1.0
        assert on_disk[dyn]["max_test_acc"]["mean"] >= on_disk[dyn]["final_test_acc"]["mean"]
    gd = on_disk["gd_phase"]
    for key in ("test_acc", "train_acc_clean", "train_acc_corrupted"):
        assert 0.0 <= gd[key]["mean"] <= 1.0
    assert "tr_HS" in gd["curves"] and "tr_HS" in on_disk["sgd"]["curves"]
    assert on_disk["meta"]["lr_after_switch"] == 0.07
    # config.json is the full resolved configuration
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))


@needs_data
def test_all_dynamics_start_at_theta_gd_and_move(smoke_run):
    out, _cfg, _, _ = smoke_run
    theta_gd = load_final(out / "seed_0" / "gd_phase")["theta"]
    finals = {d: load_final(out / "seed_0" / d)["theta"] for d in ALL_DYNAMICS}
    for d, th in finals.items():
        assert torch.isfinite(th).all() and not torch.equal(th, theta_gd), d
    # SGD and every noisy dynamics differ from GD after the switch.
    for d in ALL_DYNAMICS[1:]:
        assert not torch.equal(finals[d], finals["gd"]), d


@needs_data
def test_rerun_of_a_finished_run_only_loads(smoke_run):
    out, cfg, results, wall = smoke_run
    t0 = time.perf_counter()
    again = run(cfg, out, device="cpu", progress=False)
    assert time.perf_counter() - t0 < max(5.0, 0.5 * wall)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


@needs_data
def test_plot_redraws_from_results_only(smoke_run, tmp_path):
    out, *_ = smoke_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    paths = plot(copy)
    assert {p.name for p in paths} >= {
        "fig2_test_acc.png",
        "fig2_sharpness.png",
        "fig4_indicator.png",
    }


@needs_data
def test_run_dir_with_other_settings_is_refused(smoke_run):
    out, _cfg, *_ = smoke_run
    other = config_from("smoke", lr=0.05)
    with pytest.raises(ValueError, match="different settings .*lr"):
        run(other, out, device="cpu", progress=False)


def _rows_and_theta(run_dir: Path, phase: str):
    done = load_final(run_dir / "seed_0" / phase)
    assert done is not None, phase
    return done["rows"], done["theta"]


@needs_data
def test_interrupted_everywhere_equals_uninterrupted(smoke_run, tmp_path):
    """Stop 7 steps into every phase (past the checkpoint at 5) and resume until done: the same
    numbers (SGD's generator state, GLD's noise generator and the Lanczos warm start restored)."""
    out, _cfg, *_ = smoke_run
    dyn = ("sgd", "gld_hessian", "gld_hessian_top1")
    sub = config_from("smoke", dynamics=dyn)
    target = tmp_path / "resumed"
    calls = 0
    while True:
        calls += 1
        res = run(sub, target, device="cpu", progress=False, _stop_after=7)
        if res:
            break
        assert calls < 20
    assert calls > 1 + len(dyn)  # every phase was interrupted at least once
    for phase in ("gd_phase", *dyn):
        rows_a, th_a = _rows_and_theta(out, phase)
        rows_b, th_b = _rows_and_theta(target, phase)
        assert rows_a == rows_b, phase
        assert torch.equal(th_a, th_b), phase


@needs_data
def test_kill_9_mid_run_then_resume_gives_identical_numbers(smoke_run, tmp_path):
    out, _cfg, *_ = smoke_run
    target = tmp_path / "killed"
    dyn = ["gld_hessian_top1"]
    cmd = [sys.executable, "-m", "sgdnoise.cli", "fashion", "--profile", "smoke", "--device", "cpu",
           "--no-progress", "--out", str(target), "--dynamics", *dyn]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpt = target / "seed_0" / dyn[0] / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if killed:
        assert ckpt.exists() or (target / "seed_0" / dyn[0] / "final.pt").exists()
        assert not (target / "results.json").exists()
        # never a half-written file: every JSON file that exists parses (a kill inside an atomic
        # write may leave its temporary ".<name>.<pid>-<n>.tmp", never a partial <name>)
        for path in (p for p in target.rglob("*.json*") if p.suffix != ".tmp"):
            for line in (
                path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            ):
                json.loads(line)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for phase in ("gd_phase", *dyn):
        rows_a, th_a = _rows_and_theta(out, phase)
        rows_b, th_b = _rows_and_theta(target, phase)
        assert rows_a == rows_b, phase
        assert torch.equal(th_a, th_b), phase


def test_checkpoints_fall_on_refresh_steps_whatever_checkpoint_every():
    """A checkpoint period that is not a multiple of a refresh period is rounded up per dynamics
    (lcm), so that a resumed run restarts on a refresh step; no config is refused for it."""
    from sgdnoise.experiments.fashion_run import phase_spec

    cfg = config_from("smoke", {"checkpoint_every": 7})
    for dyn in cfg.dynamics:
        spec = phase_spec(cfg, 0, dyn)
        assert spec.checkpoint_every % spec.refresh_every == 0
        assert spec.checkpoint_every % 7 == 0
