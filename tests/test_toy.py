"""Tests for the 2-D escape experiment (sgdnoise.experiments.toy)."""

from __future__ import annotations

import json

import pytest
import torch

import sgdnoise
import sgdnoise.figures.fashion
import sgdnoise.figures.indicator
import sgdnoise.figures.prop1
import sgdnoise.figures.toy
from sgdnoise.cli import main
from sgdnoise.data import toy2d_data
from sgdnoise.experiments import toy
from sgdnoise.models import Toy2DModel, toy2d_loss, toy2d_sample_grad, toy2d_sample_hessian

F64 = torch.float64
T = 0.01

#: toy dynamics → (registered structure, options) it must agree with
REGISTERED = {
    "gld_const": ("const", {}),
    "gld_dynamic": ("dynamic", {}),
    "gld_diag": ("diag", {}),
    "gld_leading": ("leading", {"k": 2}),
    "gld_hessian": ("hessian", {"k": 2}),
    "gld_hessian_top1": ("hessian_top1", {}),
    "gld_full": ("full", {}),
}


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return toy2d_data(3, 100, generator=torch.Generator().manual_seed(0), dtype=F64)


# Points: the sharp minimum, the slope, a point where the data straddle both branches, the flat side.
POINTS = [(1.0, 1.0), (0.9, 0.95), (0.79, 0.79), (-0.6, -0.9)]


@pytest.mark.parametrize("point", POINTS)
def test_fused_statistics_match_the_model_functions(data, point):
    w = torch.tensor(point, dtype=F64).expand(3, 2)
    gbar, C, H = toy.toy_statistics(w, data)
    G = toy2d_sample_grad(w[:, None, :], data)
    assert torch.allclose(gbar, G.mean(1), rtol=1e-13, atol=1e-13)
    assert torch.allclose(C, G - G.mean(1, keepdim=True), rtol=1e-13, atol=1e-12)
    assert torch.allclose(H, toy2d_sample_hessian(w[:, None, :], data).mean(1), rtol=1e-13)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("dynamics", sorted(REGISTERED))
def test_batched_builders_agree_with_registered_structures(data, dynamics, point):
    """Run r of the batched toy builder = the registered structure on run r's Problem, at trace T."""
    w = torch.tensor(point, dtype=F64).expand(3, 2)
    _, C, H = toy.toy_statistics(w, data)
    L = toy.noise_factor(dynamics, C, H, T)
    name, opts = REGISTERED[dynamics]
    for r in range(3):
        problem = sgdnoise.Problem(
            Toy2DModel(point), toy2d_loss, data[r], torch.zeros(100, dtype=F64)
        )
        cov = sgdnoise.noise_model(name, problem, batch_size=1, **opts).covariance.to_dense()
        want = T * cov / torch.trace(cov)
        got = L[r] @ L[r].T
        lam = torch.linalg.eigvalsh(H[r])
        if dynamics == "gld_hessian_top1" and float(lam[1] - lam[0]) < 1e-9 * float(lam[1]):
            # H = 2I (all points on the flat branch): u₁ is not unique; both must be T·u uᵀ with
            # H u = λ₁ u, i.e. Tr(H Σ) = λ₁ T.
            for S in (got, want):
                assert float(torch.trace(H[r] @ S)) == pytest.approx(float(lam[1]) * T, rel=1e-9)
                assert float(torch.linalg.matrix_rank(S)) == 1
            continue
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (dynamics, point, r, got, want)
        assert torch.trace(got).item() == pytest.approx(T, rel=1e-12)


def test_gd_has_no_noise_and_indicators_at_the_sharp_minimum(data):
    cfg = toy.ToyConfig(runs=3, num_points=100)
    assert toy.noise_factor("gd", data, None, T) is None
    tr = {d: toy.tr_HS_at_start(d, data, cfg) for d in toy.ALL_DYNAMICS}
    assert torch.equal(tr["gd"], torch.zeros(3, dtype=F64))
    # At (1, 1) every point is on the sharp branch: H = [[110, 90], [90, 110]] (λ = 200, 20).
    assert torch.allclose(tr["gld_hessian_top1"], torch.full((3,), 200 * T, dtype=F64))
    assert torch.allclose(tr["gld_const"], torch.full((3,), 110 * T, dtype=F64))
    assert torch.allclose(
        tr["gld_hessian"], torch.full((3,), T * (200**2 + 20**2) / 220, dtype=F64)
    )
    assert torch.allclose(tr["gld_leading"], tr["gld_full"])


def test_vectorised_gd_equals_one_run_at_a_time(data):
    cfg = toy.ToyConfig(runs=3, steps=40)
    out = toy.simulate("gd", data, cfg, generator=torch.Generator().manual_seed(0))
    for r in range(3):
        one = toy.simulate("gd", data[r : r + 1], toy.ToyConfig(runs=1, steps=40, trajectory_run=0),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert torch.allclose(out["final"][r], one["final"][0], rtol=1e-14)


def test_one_noisy_step_by_hand(data):
    cfg = toy.ToyConfig(runs=3, steps=1, lr=0.005)
    out = toy.simulate("gld_diag", data, cfg, generator=torch.Generator().manual_seed(4))
    w0 = torch.ones(3, 2, dtype=F64)
    gbar, C, H = toy.toy_statistics(w0, data)
    L = toy.noise_factor("gld_diag", C, H, T)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    want = w0 - 0.005 * gbar - torch.einsum("rdk,rk->rd", L, z)  # parameter noise ε = −η n = −L z
    assert torch.allclose(out["final"], want, rtol=1e-13)


# --------------------------------------------------------------------------------------------
# The experiment end to end
# --------------------------------------------------------------------------------------------

SMOKE = toy.PRESETS["smoke"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("toy")
    results = toy.run(SMOKE, out, progress=False, profile="smoke")
    assert not list(out.glob("*.png")), "run() draws nothing"
    sgdnoise.figures.toy.plot(out)
    return out, results


def test_run_writes_every_artefact(smoke_run):
    out, _ = smoke_run
    for name in ["config.json", "env.json", "results.json", "runs.csv", "metrics.jsonl",
                 "trajectories.json", "surface.json", "summary.md", "meta.json",
                 "toy_trajectories.png", "toy_trajectories.svg", "toy_success.png",
                 "toy_success.svg"]:  # fmt: skip
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert list(saved) == list(toy.DEFAULT_DYNAMICS)
    for r in saved.values():
        assert {"success_rate", "ci_low", "ci_high", "tr_HS"} <= set(r)
        assert 0 <= r["ci_low"] <= r["success_rate"] <= r["ci_high"] <= 1
    assert saved["gd"]["success_rate"] == 0.0 and saved["gd"]["tr_HS"] == 0.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["runs"] == SMOKE.runs and cfg["preset"] == "smoke"
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + SMOKE.runs * len(saved)
    assert "| GLD 1st eigvec(H) |" in (out / "summary.md").read_text()


def test_plot_redraws_from_files_only(smoke_run, monkeypatch):
    out, _ = smoke_run
    monkeypatch.setattr(toy, "simulate", lambda *a, **k: pytest.fail("plot must not recompute"))
    (out / "toy_success.png").unlink()
    sgdnoise.figures.toy.plot(out)
    assert (out / "toy_success.png").exists()


def test_plot_without_results_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `sgdnoise toy --out"):
        sgdnoise.figures.toy.plot(tmp_path)


def test_same_seed_same_results_other_seed_differs(tmp_path, smoke_run):
    _, first = smoke_run
    again = toy.run(SMOKE, tmp_path / "a", progress=False)
    assert again == first
    other = toy.run(toy.ToyConfig(runs=8, steps=60, seeds=(1,), dynamics=("gld_full",)), tmp_path / "b",
                    progress=False)  # fmt: skip
    assert other["gld_full"]["tr_HS"] != first["gld_full"]["tr_HS"]


def test_a_dynamics_stream_does_not_depend_on_the_others(tmp_path, smoke_run):
    _, first = smoke_run
    alone = toy.run(
        toy.ToyConfig(runs=8, steps=60, dynamics=("gld_leading",)), tmp_path, progress=False
    )
    assert alone["gld_leading"] == first["gld_leading"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runs": 0}, "runs must be >= 1, got 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"dynamics": ("gd", "sgd")}, r"dynamics\[1\] must be one of gd, gld_const"),
        ({"k": 3}, "k must be <= 2"),
        ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
        ({"runs": 8, "trajectory_run": 8}, r"trajectory_run must be an integer in \[0, runs\)"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        toy.ToyConfig(**{**toy.ToyConfig().__dict__, **changes}).validate()


def test_cli_profile_config_and_flags(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 30\ndynamics = ["gd", "gld_hessian_top1"]\nruns = 50\n')
    rc = main(["toy", "--profile", "smoke", "--config", str(cfg), "--runs", "4", "--seeds", "3",
               "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 0
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (saved["runs"], saved["steps"], saved["seeds"]) == (
        4,
        30,
        [3],
    )  # flags > config > profile
    assert list(json.loads((tmp_path / "o" / "results.json").read_text())) == [
        "gd",
        "gld_hessian_top1",
    ]
    assert "GLD 1st eigvec(H)" in capsys.readouterr().out


def test_cli_errors_are_reported_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("stepz = 3\n")
    assert main(["toy", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown key(s) stepz; valid keys:" in capsys.readouterr().err
    assert main(["toy", "--runs", "0", "--out", str(tmp_path / "o")]) == 2
    assert "runs must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_float32_smoke(tmp_path):
    res = toy.run(toy.ToyConfig(runs=4, steps=20, dtype="float32"), tmp_path, progress=False)
    assert set(res) == set(toy.DEFAULT_DYNAMICS)
