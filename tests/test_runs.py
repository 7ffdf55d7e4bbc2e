"""Runs a researcher can trust (issue 14): completion markers, stale and damaged results, data
identity, clear CLI errors, file modes, temporary files, Wilson intervals, `plot` on one folder.

FashionMNIST runs here use small stand-in IDX files (random pixels), so they need no download.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fake_fashion import write_fashion
from sgdnoise import cli
from sgdnoise._utils import atomic_write_text, sweep_temp
from sgdnoise.commands import reproduce
from sgdnoise.config import replace_config
from sgdnoise.data import FASHION_MNIST_FILES
from sgdnoise.experiments import fashion, toy
from sgdnoise.runs import COMPLETE, RunDir, wilson_interval


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these runs are tiny, and a busy shared CPU makes two threads slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# The smoke preset cut further (two dynamics, 4 + 4 steps, tiny measurements): seconds per run.
SMALL = dataclasses.replace(
    fashion.PRESETS["smoke"],
    dynamics=("gd", "sgd"),
    n_train=30,
    n_clean=25,
    n_test=40,
    batch_size=10,
    gd_iterations=4,
    iterations=4,
    checkpoint_every=2,
    gd_eval_every=2,
    eval_every=2,
    sharpness_draws=2,
    indicator_samples=2,
    indicator_trace_matvecs=4,
)


@pytest.fixture
def small_fashion(monkeypatch: pytest.MonkeyPatch) -> fashion.FashionConfig:
    """The smoke preset with two dynamics (what `reproduce --profile smoke` then runs)."""
    monkeypatch.setitem(fashion.PRESETS, "smoke", SMALL)
    return SMALL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fashion_a"))


# ------------------------------------------------------------------------------ item 1


def test_reproduce_data_dir_runs_fashion_on_that_folder(
    tmp_path: Path, data_dir: Path, small_fashion: fashion.FashionConfig
) -> None:
    out = tmp_path / "R"
    argv = ["reproduce", "--profile", "smoke", "--only", "fashion", "--no-progress"]
    assert cli.main([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    res = json.loads((out / "fashion" / "results.json").read_text())
    assert res["meta"]["data_source"] == str(data_dir)
    assert set(res["meta"]["data_files"]) == set(FASHION_MNIST_FILES)
    marker = json.loads((out / "fashion" / COMPLETE).read_text())
    assert marker["experiment"] == "fashion"
    assert marker["data"]["files"] == res["meta"]["data_files"]
    assert (out / "report.md").is_file()


# ------------------------------------------------------------------------------ item 2


def test_results_of_another_config_are_rerun_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "R"
    assert cli.main(["toy", "--profile", "smoke", "--seeds", "5", "--out", str(out / "toy"),
                     "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    reproduce("smoke", out, only=("toy",), progress=False)
    err = capsys.readouterr().err
    assert "already finished" not in err
    assert "seeds: [5] → [0]" in err and "moved it to" in err
    assert json.loads((out / "toy" / COMPLETE).read_text())["config"]["seeds"] == [0]
    # The other run is kept, not deleted.
    assert json.loads((out / "toy.stale-1" / COMPLETE).read_text())["config"]["seeds"] == [5]
    # Now the same config: skipped.
    reproduce("smoke", out, only=("toy",), progress=False)
    assert "already finished" in capsys.readouterr().err


def test_a_folder_without_completion_marker_is_not_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "R"
    reproduce("smoke", out, only=("toy",), progress=False)
    (out / "toy" / COMPLETE).unlink()  # as if killed after results.json, before the marker
    capsys.readouterr()
    reproduce("smoke", out, only=("toy",), progress=False)
    err = capsys.readouterr().err
    assert "already finished" not in err and "resuming into" in err
    assert (out / "toy" / COMPLETE).exists()


def test_completion_marker_is_removed_when_a_run_restarts(tmp_path: Path) -> None:
    cfg = toy.PRESETS["smoke"]
    toy.run(cfg, tmp_path, progress=False)
    assert RunDir(tmp_path).completion()["config"]["runs"] == cfg.runs

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    orig = toy.simulate
    toy.simulate = boom  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError):
            toy.run(cfg, tmp_path, progress=False)
    finally:
        toy.simulate = orig
    assert RunDir(tmp_path).completion() is None


# ------------------------------------------------------------------------------ item 3


def _fashion_results(path: Path) -> dict:
    res = json.loads((path / "results.json").read_text())
    for entry in res.values():
        if isinstance(entry, dict):
            entry.pop("wall_s", None)
            entry.pop("seconds_per_step", None)
    res["gd_phase"].pop("wall_s", None)
    return res


@pytest.fixture(scope="module")
def fashion_ref(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("fashion_ref")
    fashion.run(SMALL, out, device="cpu", data_dir=data_dir, progress=False)
    return out


@pytest.mark.parametrize("name", ["final.pt", "checkpoint.pt"])
def test_damaged_checkpoint_is_named_moved_aside_and_recomputed(
    tmp_path: Path,
    data_dir: Path,
    fashion_ref: Path,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    if name == "final.pt":
        fashion.run(SMALL, out, device="cpu", data_dir=data_dir, progress=False)
        phase = out / "seed_0" / "sgd"
    else:  # interrupted after 3 steps of the GD phase: a checkpoint at step 2
        fashion.run(SMALL, out, device="cpu", data_dir=data_dir, progress=False, _stop_after=3)
        phase = out / "seed_0" / "gd_phase"
    target = phase / name
    target.write_bytes(target.read_bytes()[:100])  # truncated
    capsys.readouterr()
    fashion.run(SMALL, out, device="cpu", data_dir=data_dir, progress=False)
    err = capsys.readouterr().err
    assert str(target) in err and "damaged" in err and f"{name}.damaged-1" in err
    assert (phase / f"{name}.damaged-1").stat().st_size == 100  # kept for inspection
    assert _fashion_results(out) == _fashion_results(fashion_ref)


def test_damaged_results_json_is_named_by_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toy.run(toy.PRESETS["smoke"], tmp_path, progress=False)
    (tmp_path / "results.json").write_text('{"gd": {')
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results.json") in err and "damaged" in err
    assert "Traceback" not in err


def test_reproduce_recomputes_a_part_whose_results_are_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "R"
    reproduce("smoke", out, only=("toy",), progress=False)
    good = json.loads((out / "toy" / "results.json").read_text())
    (out / "toy" / "results.json").write_text('{"gd": {"success')  # truncated
    capsys.readouterr()
    reproduce("smoke", out, only=("toy",), progress=False)
    err = capsys.readouterr().err
    assert str(out / "toy" / "results.json") in err and "results.json.damaged-1" in err
    assert "already finished" not in err
    assert json.loads((out / "toy" / "results.json").read_text()) == good
    assert (out / "toy" / "results.json.damaged-1").read_text() == '{"gd": {"success'


# ------------------------------------------------------------------------------ item 4


def test_resume_on_other_data_is_refused(tmp_path: Path, data_dir: Path) -> None:
    other = write_fashion(tmp_path / "other", seed=1)
    out = tmp_path / "run"
    fashion.run(SMALL, out, device="cpu", data_dir=data_dir, progress=False, _stop_after=3)
    with pytest.raises(ValueError, match=r"mix two data sets.*--data-dir"):
        fashion.run(SMALL, out, device="cpu", data_dir=other, progress=False)
    # A copy of the same files elsewhere is the same data: resuming is fine.
    same = write_fashion(tmp_path / "copy", seed=0)
    res = fashion.run(SMALL, out, device="cpu", data_dir=same, progress=False)
    assert res["meta"]["data_source"] == str(same)


def test_reproduce_reruns_fashion_when_the_data_differ(
    tmp_path: Path, data_dir: Path, small_fashion: fashion.FashionConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "R"
    reproduce("smoke", out, only=("fashion",), data_dir=str(data_dir), progress=False)
    other = write_fashion(tmp_path / "other", seed=3)
    capsys.readouterr()
    reproduce("smoke", out, only=("fashion",), data_dir=str(other), progress=False)
    err = capsys.readouterr().err
    assert "input data files differ" in err and "already finished" not in err
    assert json.loads((out / "fashion" / "results.json").read_text())["meta"]["data_source"] == str(
        other
    )


def test_fewer_test_images_than_asked_is_refused_and_actual_count_recorded(
    tmp_path: Path,
) -> None:
    few = write_fashion(tmp_path / "few", n_test=30)
    with pytest.raises(ValueError, match=r"n_test=40 .* holds only 30"):
        fashion.run(SMALL, tmp_path / "a", device="cpu", data_dir=few, progress=False)
    assert not (tmp_path / "a" / "seed_0").exists()
    cfg = dataclasses.replace(SMALL, n_test=None, dynamics=("gd",))
    res = fashion.run(cfg, tmp_path / "b", device="cpu", data_dir=few, progress=False)
    assert res["meta"]["n_test"] == 30


# ------------------------------------------------------------------------------ item 5


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unwritable_out_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["toy", "--profile", "smoke", "--no-progress", "--out"]
    assert cli.main([*base, str(afile)]) == 2
    assert "is a file, not a folder" in _err(capsys)
    assert cli.main([*base, str(afile / "sub")]) == 2
    assert "a part of the path is a file" in _err(capsys)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert cli.main([*base, str(ro / "x")]) == 2
        assert "permission denied" in _err(capsys)


def test_full_disk_gives_one_line_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sgdnoise._utils.os.fsync", full)
    out = tmp_path / "out"
    assert cli.main(["toy", "--profile", "smoke", "--no-progress", "--out", str(out)]) == 2
    err = _err(capsys)
    assert "the disk is full" in err and "config.json" in err
    assert not list(out.rglob("*.tmp"))


def test_bad_device_and_huge_runs_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "o")
    assert cli.main(["toy", "--device", "meta", "--out", out]) == 2
    assert "device 'meta' is not supported" in _err(capsys)
    assert cli.main(["reproduce", "--device", "meta", "--out", out]) == 2
    assert "not supported" in _err(capsys)
    assert cli.main(["toy", "--runs", "1000000000", "--out", out, "--no-progress"]) == 2
    assert "lower --runs" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_toml_errors_name_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("runs = 3\nsteps = = 4\n")
    for cmd in ("toy", "indicator", "prop1", "fashion"):
        assert cli.main([cmd, "--config", str(bad), "--out", str(tmp_path / cmd)]) == 2
        err = _err(capsys)
        assert str(bad) in err and "line 2" in err and "not valid TOML" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threshold = true", "threshold must be a number, got True"),
        ("trajectory_run = true", "trajectory_run must be an integer, got True"),
        ("runs = 2.5", "runs must be an integer, got 2.5"),
        ('start = [1, "a"]', "start[1] must be a number, got 'a'"),
        ("dynamics = 3", "dynamics must be a list, got 3"),
    ],
)
def test_config_values_are_type_checked_strictly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    assert cli.main(["toy", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_strict_types_across_configs() -> None:
    with pytest.raises(ValueError, match="leading_match_trace must be true or false, got 1"):
        replace_config(fashion.PRESETS["smoke"], {"leading_match_trace": 1}, what="fashion")
    with pytest.raises(ValueError, match="n_test must be an integer, got True"):
        replace_config(fashion.PRESETS["smoke"], {"n_test": True}, what="fashion")
    with pytest.raises(ValueError, match="refresh_every.gld_diag must be an integer, got 1.5"):
        replace_config(fashion.PRESETS["smoke"], {"refresh_every": {"gld_diag": 1.5}},
                       what="fashion")  # fmt: skip
    ok = replace_config(toy.PRESETS["smoke"], {"threshold": -1, "start": [0, 1.5]}, what="toy")
    assert ok.threshold == -1 and ok.start == (0, 1.5)  # an integer is a number
    with pytest.raises(ValueError, match="trajectory_run must be an integer"):
        dataclasses.replace(toy.PRESETS["smoke"], trajectory_run=True).validate()


def test_unexpected_errors_are_one_line_unless_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("oops")

    from sgdnoise.experiments import EXPERIMENTS

    monkeypatch.setitem(EXPERIMENTS, "toy", dataclasses.replace(EXPERIMENTS["toy"], run=bug))
    argv = ["toy", "--profile", "smoke", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    err = _err(capsys)
    assert "unexpected KeyError" in err and "sgdnoise --debug toy" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", *argv])


# ------------------------------------------------------------------------------ item 6


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        toy.run(toy.PRESETS["smoke"], tmp_path, progress=False)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p
    assert not list(tmp_path.rglob("*.tmp"))


def test_temporary_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    dead = tmp_path / "sub" / ".fig.png.999999999-3.tmp"  # no such process
    dead.parent.mkdir()
    dead.write_bytes(b"half")
    alive = tmp_path / f".results.json.{os.getppid()}-0.tmp"  # a running process: kept
    alive.write_bytes(b"writing")
    other = tmp_path / "notes.tmp"  # not ours: kept
    other.write_text("x")
    assert sweep_temp(tmp_path) == [dead]
    assert alive.exists() and other.exists() and not dead.exists()
    dead.write_bytes(b"half")
    RunDir(tmp_path)  # every run sweeps its folder when it starts
    assert not dead.exists()


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr("sgdnoise._utils.os.replace", fail)
    with pytest.raises(OSError, match="cannot write"):
        atomic_write_text(tmp_path / "x.txt", "hello")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ item 8


@pytest.mark.parametrize("n", [*range(1, 41), 99, 100, 101, 1000, 12345])
def test_wilson_interval_is_exact_at_the_edges_and_holds_the_rate(n: int) -> None:
    prev = (-1.0, -1.0)
    for k in range(n + 1):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        assert lo >= prev[0] and hi >= prev[1]  # monotone in k
        prev = (lo, hi)
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    assert wilson_interval(0, n)[1] > 0.0 and wilson_interval(n, n)[0] < 1.0


def test_wilson_interval_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(5, 4)
    assert wilson_interval(0, 100)[1] == pytest.approx(
        3.841459 / 103.841459, rel=1e-6
    )  # z²/(n + z²)


# ------------------------------------------------------------------------------ item 11


@pytest.mark.parametrize("drop_marker", [False, True])
def test_plot_on_one_experiments_output_folder(
    tmp_path: Path, drop_marker: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "DIR"
    assert cli.main(["toy", "--profile", "smoke", "--out", str(out), "--no-progress"]) == 0
    if drop_marker:  # a folder written before the completion marker existed
        (out / COMPLETE).unlink()
    (out / "toy_success.png").unlink()
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "toy_success.png").exists()
    assert "toy_success.png" in capsys.readouterr().out
