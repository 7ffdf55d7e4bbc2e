"""``sgdnoise measure`` end to end (in-process), and one clear line with exit code 2 per bad input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sgdnoise
from sgdnoise.cli import main
from sgdnoise.monitor import _OFFSET

MODULE = """
import torch
from torch import nn
import torch.nn.functional as F


def make():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def make_regression():
    return nn.Linear(4, 2), F.smooth_l1_loss


def wrong_shape():
    return nn.Linear(5, 3)


def not_a_model():
    return 42


def loader():
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4)
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "a&b"  # the HTML page must escape it
    folder.mkdir()
    (folder / "usermodels.py").write_text(textwrap.dedent(MODULE))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4))
    y = rng.integers(0, 3, 12).astype(np.int32)
    np.savez(tmp_path / "probe.npz", x=x, y=y)
    np.savez(tmp_path / "keys.npz", features=x, labels=y)
    torch.save(
        {"inputs": torch.randn(8, 4, dtype=torch.float64), "targets": torch.randn(8, 2)},
        tmp_path / "reg.pt",
    )
    g = torch.Generator().manual_seed(5)
    weights = {"0.weight": torch.randn(6, 4, generator=g), "0.bias": torch.zeros(6),
               "3.weight": torch.randn(3, 6, generator=g), "3.bias": torch.zeros(3)}  # fmt: skip
    torch.save(weights, tmp_path / "w.pt")
    torch.save({"0.weight": torch.zeros(7, 4)}, tmp_path / "bad_w.pt")
    return {"module": folder / "usermodels.py", "npz": tmp_path / "probe.npz",
            "keys": tmp_path / "keys.npz", "pt": tmp_path / "reg.pt",
            "weights": tmp_path / "w.pt", "bad_weights": tmp_path / "bad_w.pt",
            "out": tmp_path / "out", "weights_dict": weights, "x": x, "y": y}  # fmt: skip


def test_measure_end_to_end(files, capsys) -> None:
    out = files["out"]
    argv = ["measure", "--model", f"{files['module']}:make", "--weights", str(files["weights"]),
            "--data", str(files["npz"]), "--batch-size", "4", "--out", str(out), "--seed", "3",
            "--quantities", "loss", "tr_HS", "tr_HS_iso", "b_simple"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ETA" in captured.err and "escape_indicator" in captured.err
    assert "tr_HS" in captured.out and "measure.html" in captured.out
    result = json.loads((out / "measure.json").read_text())
    assert result["num_samples"] == 12 and result["dim"] == 51 and result["batch_size"] == 4
    assert result["loss"].startswith("cross_entropy")
    assert list(result["quantities"]) == ["loss", "tr_HS", "tr_HS_iso", "b_simple"]
    # the same numbers as the library on the loaded weights, in eval mode
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(6, 3)
    )
    model.load_state_dict(files["weights_dict"])
    model.eval()
    x = torch.from_numpy(files["x"]).float()
    y = torch.from_numpy(files["y"]).long()
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    seed = result["measurement_seed"]
    ind = sgdnoise.escape_indicator(
        problem, 4, generator=torch.Generator().manual_seed(seed + _OFFSET["tr_HS"])
    )
    q = result["quantities"]
    assert q["tr_HS"]["value"] == pytest.approx(ind.tr_HS, rel=1e-6)
    assert q["tr_HS_iso"]["value"] == pytest.approx(ind.tr_HS_iso, rel=1e-6)
    assert q["loss"]["value"] == pytest.approx(float(problem.loss()), rel=1e-6)
    b = sgdnoise.gradient_noise_scale(problem).b_simple
    assert q["b_simple"]["value"] == pytest.approx(b, rel=1e-5)
    page = (out / "measure.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "a&amp;b" in page and "a&b" not in page
    assert "http" not in page and "<script" not in page and "<link" not in page


def test_measure_pt_file_factory_loss_and_module_data(files, monkeypatch) -> None:
    out = files["out"]
    # a .pt file with inputs/targets, floating targets, (model, loss_fn) from the factory
    argv = ["measure", "--model", f"{files['module']}:make_regression", "--data", str(files["pt"]),
            "--batch-size", "2", "--out", str(out), "--quantities", "tr_S", "lambda_max",
            "--no-progress", "--dtype", "float64"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "measure.json").read_text())
    assert result["loss"] == f"returned by {files['module']}:make_regression"
    assert result["dtype"] == "float64" and result["quantities"]["tr_S"]["value"] > 0
    # a dotted MODULE:FACTORY for the data (a DataLoader), from the current folder
    monkeypatch.chdir(files["module"].parent)
    argv = ["measure", "--model", "usermodels:make", "--data", "usermodels:loader",
            "--batch-size", "3", "--out", str(out), "--quantities", "loss", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "measure.json").read_text())
    assert result["num_samples"] == 10 and result["loss"].startswith("cross_entropy")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "no_such_module_xyz:make"}, "module 'no_such_module_xyz' not found"),
        ({"--model": "{module}:nope"}, "has no function 'nope'; callables there: "),
        ({"--model": "{module}:not_a_model"}, "returned int; expected an nn.Module"),
        ({"--data": "{tmp}/missing.npz"}, "no such data file"),
        ({"--data": "{tmp}/keys.npz"}, "has keys ['features', 'labels']; expected 'x'/'y' or"),
        ({"--weights": "{tmp}/missing.pt"}, "no such weights file"),
        ({"--weights": "{tmp}/bad_w.pt"}, "do not fit the model (missing: 0.bias, 3.weight,"),
        ({"--weights": "{tmp}/probe.npz"}, "cannot load weights"),
        ({"--model": "{module}:wrong_shape"}, "the model cannot be evaluated on the data"),
        ({"--quantities": "tr_HSS"}, "unknown quantity 'tr_HSS'; valid: loss, tr_HS,"),
        ({"--batch-size": "0"}, "--batch-size must be a positive integer"),
    ],
)
def test_measure_bad_input_exit_2(files, capsys, change, message) -> None:
    opts = {"--model": "{module}:make", "--data": "{tmp}/probe.npz", "--batch-size": "4",
            "--weights": None, "--quantities": "loss"}  # fmt: skip
    opts.update(change)
    argv = ["measure", "--out", str(files["out"]), "--no-progress"]
    for key, value in opts.items():
        if value is not None:
            tmp = files["npz"].parent
            argv += [key, value.format(module=files["module"], tmp=tmp)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sgdnoise measure: error: ") and message in err, err
    assert not (files["out"] / "measure.json").exists()
