"""The experiment protocol: one declaration per config gives the flags, the TOML keys and the
validation, with the same names for the same things in every experiment."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from sgdnoise import cli
from sgdnoise.config import ConfigError
from sgdnoise.experiments import EXPERIMENTS

COMMON = ("--profile", "--config", "--out", "--device", "--no-progress")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_help_has_common_options_and_one_flag_per_field(name, capsys):
    text = _help(capsys, name)
    flags = _flags(text)
    assert set(COMMON) <= flags
    fields = [f.name for f in dataclasses.fields(EXPERIMENTS[name].config) if f.name != "profile"]
    for field in fields:
        assert "--" + field.replace("_", "-") in flags, field
    assert "%%" not in text


def test_same_names_for_the_same_things_everywhere(capsys):
    per = {name: _flags(_help(capsys, name)) for name in EXPERIMENTS}
    every = set().union(*per.values())
    assert "--seed" not in every and "--batch" not in every
    # one name per meaning: the b of Σ_b, the Lanczos tolerance, the eigenpairs kept
    for other in ("--noise-batch-size", "--eigen-tol", "--leading-k"):
        assert other not in every, other
    assert "--batch-size" in per["indicator"] and "--lanczos-tol" in per["fashion"]
    assert "--k" in per["toy"] and "--k" in per["fashion"]
    assert "--seeds" in set.intersection(*per.values())
    assert "--batch-size" in per["fashion"] and "--dtype" in per["toy"]
    for name in EXPERIMENTS:
        parser = cli.build_parser()
        args = parser.parse_args([name])
        assert (args.profile, args.device) == ("quick", "auto")
    for cmd in ("reproduce", "list", "plot"):
        assert "%%" not in _help(capsys, cmd)
    args = cli.build_parser().parse_args(["reproduce"])
    assert (args.profile, args.device) == ("quick", "auto")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_field_is_a_toml_key(name, tmp_path):
    exp = EXPERIMENTS[name]
    preset = exp.presets["smoke"]
    toml = preset.to_dict()
    assert exp.configure("quick", toml) == preset
    with pytest.raises(ConfigError, match="unknown key.*valid keys"):
        exp.configure("quick", {"no_such_key": 1})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["toy", "--runs", "0"], "toy config: runs must be >= 1, got 0"),
        (["indicator", "--epochs", "0"], "indicator config: epochs must be >= 1, got 0"),
        (["prop1", "--k", "0"], "prop1 config: k must be >= 1, got 0"),
        (["fashion", "--batch-size", "0"], "fashion config: batch_size must be >= 1, got 0"),
        (["fashion", "--dynamics", "gd", "gd"], "dynamics must not repeat values"),
        (["toy", "--seeds", "-1"], "seeds[0] must be >= 0, got -1"),
    ],
)
def test_bad_values_give_one_line(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--" in err, err
    assert not (tmp_path / "o").exists()


def test_reproduce_validates_every_config_first(tmp_path, monkeypatch):
    exp = EXPERIMENTS["fashion"]
    bad = exp.presets["smoke"]
    object.__setattr__(bad := dataclasses.replace(bad), "batch_size", 0)
    monkeypatch.setitem(EXPERIMENTS, "fashion", dataclasses.replace(exp, presets={"smoke": bad}))
    from sgdnoise.commands import reproduce

    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        reproduce("smoke", tmp_path / "r", device="cpu", progress=False)
    assert not (tmp_path / "r" / "toy").exists()


def test_list_prints_whole_sentences(capsys):
    assert cli.main(["list"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ") and
             not ln.startswith("      ")]  # fmt: skip
    assert len(lines) == len(EXPERIMENTS)
    assert all(ln.rstrip().endswith(".") for ln in lines), lines


_NO_MPL = "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None; "


def test_library_imports_without_matplotlib():
    code = _NO_MPL + "import sgdnoise, sgdnoise.experiments, sgdnoise.report, sgdnoise.cli"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_figure_commands_without_matplotlib_say_how_to_install(tmp_path):
    run_dir = tmp_path / "toy"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    (run_dir / "complete.json").write_text('{"experiment": "toy", "config": {}}')
    code = (
        _NO_MPL
        + f"from sgdnoise.cli import main; raise SystemExit(main(['plot', {str(run_dir)!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "pip install 'sgdnoise[plot]'" in out.stderr


def test_config_errors_from_python_are_one_line():
    toy = EXPERIMENTS["toy"].config
    with pytest.raises(ConfigError) as info:
        toy(runs=0, lr=-1.0)
    assert "\n" not in str(info.value) and str(info.value).startswith("toy config: runs")
    assert isinstance(info.value, ValueError)


def test_mapping_flags_convert_values_to_the_field_type():
    """``--refresh-every NAME=VALUE`` gives ints (the value type sits inside Annotated)."""
    from sgdnoise.cli import build_parser

    args = build_parser().parse_args(["fashion", "--refresh-every", "gld_leading=5"])
    assert args.refresh_every == [("gld_leading", 5)]
    assert isinstance(args.refresh_every[0][1], int)
