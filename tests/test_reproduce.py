"""`sgdnoise reproduce --profile smoke` end to end, the report, `plot`, `list` and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdnoise import cli
from sgdnoise.commands import reproduce
from sgdnoise.data import DataNotFoundError, find_fashion_mnist
from sgdnoise.report import claims, write_report


def _have_fashion() -> bool:
    try:
        find_fashion_mnist(None)
    except DataNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    only = None if _have_fashion() else ("toy", "indicator", "prop1")
    reproduce("smoke", out, device="cpu", only=only, progress=False)
    return out


def test_smoke_profile_writes_every_part_and_the_report(smoke_dir: Path) -> None:
    parts = ["toy", "indicator", "prop1"] + (["fashion"] if _have_fashion() else [])
    for name in parts:
        for f in ("config.json", "env.json", "results.json", "summary.md"):
            assert (smoke_dir / name / f).is_file(), (name, f)
        assert list((smoke_dir / name).glob("*.png")) and list((smoke_dir / name).glob("*.svg"))
        env = json.loads((smoke_dir / name / "env.json").read_text())
        assert {"torch", "python", "device"} <= set(env)
    md = (smoke_dir / "report.md").read_text()
    assert md.startswith("# Reproduction report")
    assert "| experiment | claim | paper | ours | verdict | based on | rule |" in md
    html = (smoke_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and 'src="toy/' not in html
    timings = json.loads((smoke_dir / "timings.json").read_text())
    assert set(parts) <= set(timings)


def test_verdicts_come_from_the_numbers(smoke_dir: Path) -> None:
    rows = claims(smoke_dir)
    # Smoke sizes test no claim: every computed row says so instead of giving a verdict.
    assert {r.verdict for r in rows} <= {"not tested (smoke)", "not run"}
    for r in rows:
        if r.verdict != "not run":
            assert r.rule and r.ours and r.basis.startswith("smoke sizes")
    # Changing the saved numbers changes the verdict: the rule is applied, not written by hand.
    toy = json.loads((smoke_dir / "toy" / "results.json").read_text())
    for k in ("gld_leading", "gld_hessian", "gld_hessian_top1", "gld_full"):
        toy[k].update(success_rate=0.9, ci_low=0.8, ci_high=0.95)
    for k in ("gld_const", "gld_diag"):
        toy[k].update(success_rate=0.0, ci_low=0.0, ci_high=0.05)
    fake = smoke_dir.parent / "fake_report"
    (fake / "toy").mkdir(parents=True, exist_ok=True)
    (fake / "toy" / "results.json").write_text(json.dumps(toy))
    first = next(r for r in claims(fake) if r.experiment == "toy")
    assert first.verdict == "reproduced"
    for k in ("gld_leading", "gld_hessian", "gld_hessian_top1", "gld_full"):
        toy[k].update(success_rate=0.0, ci_low=0.0, ci_high=0.05)
    (fake / "toy" / "results.json").write_text(json.dumps(toy))
    assert next(r for r in claims(fake) if r.experiment == "toy").verdict == "not reproduced"
    md, html = write_report(fake)
    assert "**not run**" in md.read_text() and html.exists()


def test_rerun_skips_finished_parts(smoke_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in smoke_dir.glob("*/results.json")}
    reproduce("smoke", smoke_dir, device="cpu", only=("toy", "prop1"), progress=False)
    err = capsys.readouterr().err
    assert "already finished" in err
    for p, t in before.items():
        if p.parent.name in ("toy", "prop1"):
            assert p.stat().st_mtime_ns == t


def test_plot_redraws_without_recomputing(
    smoke_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = smoke_dir / "toy" / "toy_success.png"
    png.unlink()
    results = (smoke_dir / "toy" / "results.json").read_bytes()
    assert cli.main(["plot", str(smoke_dir / "toy")]) == 0
    assert png.exists() and (smoke_dir / "toy" / "results.json").read_bytes() == results
    assert cli.main(["plot", str(smoke_dir)]) == 0  # a whole reproduce folder, report included
    capsys.readouterr()


def test_list_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("toy", "indicator", "prop1", "fashion", "smoke", "quick", "paper"):
        assert name in out
    for cmd in ("reproduce", "toy", "indicator", "prop1", "fashion", "plot"):
        with pytest.raises(SystemExit) as info:
            cli.main([cmd, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: sgdnoise {cmd}")
        assert cmd == "plot" or "default" in out


def test_invalid_values_stop_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["reproduce", "--device", "tpu", "--out", str(tmp_path / "r")]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert not (tmp_path / "r" / "toy").exists()
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--profile", "huge"])
