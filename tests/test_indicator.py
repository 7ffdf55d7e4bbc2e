"""Tests for sgdnoise.experiments.indicator: the one-hidden-layer escape indicator (Fig. 4 left)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

import sgdnoise.figures.fashion
import sgdnoise.figures.indicator
import sgdnoise.figures.prop1
import sgdnoise.figures.toy
from sgdnoise import Problem
from sgdnoise.cli import main
from sgdnoise.data import one_hidden_layer_data
from sgdnoise.experiments import indicator as ind
from sgdnoise.linalg import gauss_newton
from sgdnoise.models import OneHiddenLayerNet, one_hidden_layer_loss

F64 = torch.float64


def _trained(width: int = 8, n: int = 80, steps: int = 60, seed: int = 0, delta: float = 1e-3):
    """A small float64 network trained a little with full-batch Adam, and its data."""
    x, y = one_hidden_layer_data(n, generator=torch.Generator().manual_seed(123), dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    model = OneHiddenLayerNet(width, generator=gen, delta=delta, dtype=F64)
    while not bool(model.unclipped(x).any()):
        model.reset_parameters(generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        one_hidden_layer_loss(model(x), y).backward()
        opt.step()
    return model, x, y


def _dense_reference(model: OneHiddenLayerNet, x: torch.Tensor, y: torch.Tensor, b: int):
    """Dense float64 H (torch.func.hessian) and Σ_b from a Python loop over per-sample gradients."""
    names = ["weight", "bias"]
    theta0 = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    h = model.hidden

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        params = {"weight": theta[: 2 * h].reshape(h, 2), "bias": theta[2 * h :],
                  "output_weight": model.output_weight}  # fmt: skip
        return one_hidden_layer_loss(functional_call(model, params, (x,)), y)

    H = torch.func.hessian(loss_of)(theta0)
    G = []
    for i in range(x.shape[0]):
        m = OneHiddenLayerNet(h, generator=None, delta=model.delta, dtype=F64)
        m.load_state_dict(model.state_dict())
        one_hidden_layer_loss(m(x[i : i + 1]), y[i : i + 1]).backward()
        G.append(torch.cat([getattr(m, n).grad.reshape(-1) for n in names]))
    G = torch.stack(G)
    N = x.shape[0]
    C = G - G.mean(0)
    S = C.T @ C / N * (N - b) / (b * (N - 1))  # without replacement
    return H, S, G


# --------------------------------------------------------------------------------------------
# The networks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [32, 128, 512])
def test_parameter_counts(width):
    model = OneHiddenLayerNet(width, generator=torch.Generator().manual_seed(0))
    x, y = one_hidden_layer_data(20, generator=torch.Generator().manual_seed(1))
    problem = Problem(model, one_hidden_layer_loss, x, y)
    assert problem.dim == 3 * width == sum(p.numel() for p in model.parameters())
    assert model.output_weight.tolist() == [1.0] * (width // 2) + [-1.0] * (width // 2)


def test_clipping_and_zero_gradient_of_clipped_samples():
    model, x, y = _trained(width=8, delta=0.05)
    out = model(x).detach()
    assert float(out.min()) >= 0.05 and float(out.max()) <= 0.95
    mask = model.unclipped(x)
    assert 0 < int(mask.sum()) < x.shape[0]  # both kinds present
    problem = Problem(model, one_hidden_layer_loss, x, y)
    J = gauss_newton(problem).jacobian()[0][:, 0]
    G = problem.per_sample_gradients()
    assert torch.equal((J != 0).any(1), mask)
    assert float(G[~mask].abs().max()) == 0.0
    # g_i = 2 r_i ∇φ_i for the unclipped samples.
    r = (out - y)[:, None]
    torch.testing.assert_close(G[mask], 2 * r[mask] * J[mask], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Exactness of the closed-form Hessian and of the measurements
# --------------------------------------------------------------------------------------------


def test_closed_form_hessian_matches_torch_func_and_double_backward():
    model, x, y = _trained()
    problem = Problem(model, one_hidden_layer_loss, x, y)
    H_ref, _, _ = _dense_reference(model, x, y, 10)
    D = problem.dim
    H = gauss_newton(problem) @ torch.eye(D, dtype=F64)
    torch.testing.assert_close(H, H_ref, rtol=1e-10, atol=1e-13)
    V = torch.randn(D, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(gauss_newton(problem) @ V, problem.hvp(V), rtol=1e-10, atol=1e-13)
    # Indices select a sub-average, like the base class.
    idx = torch.arange(0, x.shape[0], 3)
    torch.testing.assert_close(
        gauss_newton(problem, indices=idx) @ V, problem.hvp(V, indices=idx), rtol=1e-10, atol=1e-13
    )


def test_measure_matches_dense_float64_reference():
    model, x, y = _trained()
    b = 10
    row = ind.measure(model, x, y, batch_size=b, replacement=False, hessian_check_vectors=3)
    H, S, _ = _dense_reference(model, x, y, b)
    D = H.shape[0]
    tr_HS = float(torch.trace(H @ S))
    tr_iso = float(torch.trace(H) * torch.trace(S) / D)
    assert row["tr_HS"] == pytest.approx(tr_HS, rel=1e-9)
    assert row["tr_HS_iso"] == pytest.approx(tr_iso, rel=1e-9)
    assert row["ratio"] == pytest.approx(tr_HS / tr_iso, rel=1e-9)
    evals, evecs = torch.linalg.eigh(H)
    u1 = evecs[:, -1]
    a_ref = float(u1 @ S @ u1) * float(torch.trace(H)) / (float(evals[-1]) * float(torch.trace(S)))
    assert row["lambda_1"] == pytest.approx(float(evals[-1]), rel=1e-8)
    assert row["alignment"] == pytest.approx(a_ref, rel=1e-6)
    assert row["hessian_check_rel_err"] < 1e-12
    out = model(x).detach()
    assert row["train_loss"] == pytest.approx(float(((out - y) ** 2).mean()), rel=1e-12)
    assert row["train_accuracy"] == pytest.approx(
        float(((out > 0.5).double() == y).double().mean())
    )
    # The ratio is scale-free: with replacement (Σ_b = Σ_1/b) it is unchanged.
    row2 = ind.measure(model, x, y, batch_size=b, replacement=True)
    assert row2["ratio"] == pytest.approx(row["ratio"], rel=1e-9)
    assert row2["alignment"] == pytest.approx(row["alignment"], rel=1e-6)


def test_proposition2_bound_holds_for_the_second_moment():
    """u₁ᵀMu₁·Tr H/(λ₁ Tr M) ≥ r_min²/r_max² for M = (1/N) Σ g_i g_iᵀ (the bound we record)."""
    for delta in (1e-3, 0.1):
        model, x, y = _trained(width=10, delta=delta, steps=40)
        H, _, G = _dense_reference(model, x, y, 10)
        M = G.T @ G / G.shape[0]
        evals, evecs = torch.linalg.eigh(H)
        u1 = evecs[:, -1]
        a_M = float(u1 @ M @ u1) * float(torch.trace(H)) / (float(evals[-1]) * float(M.trace()))
        row = ind.measure(model, x, y)
        assert row["a_bound"] >= delta**2 / 1.0  # |r| ≤ 1 for targets in {0, 1}
        assert a_M >= row["a_bound"] * (1 - 1e-12)


def test_measure_of_a_dead_network_is_nan_not_an_error():
    model = OneHiddenLayerNet(4, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        model.bias.fill_(-10.0)  # every unit off: f = 0 < δ everywhere
    x, y = one_hidden_layer_data(30, generator=torch.Generator().manual_seed(0), dtype=F64)
    row = ind.measure(model, x, y)
    assert row["frac_active"] == 0.0
    assert math.isnan(row["ratio"]) and math.isnan(row["alignment"])


# --------------------------------------------------------------------------------------------
# Training protocol
# --------------------------------------------------------------------------------------------


def test_learning_rate_schedule_is_the_released_one():
    cfg = ind.IndicatorConfig()
    lrs = [ind.learning_rate(cfg, e) for e in range(31)]
    # released gd.py: lr if ep < 21 else lr * (31 - ep) / (31 - 21)
    ref = [1e-3 if e < 21 else 1e-3 * (31 - e) / 10 for e in range(31)]
    assert lrs == pytest.approx(ref)
    assert lrs[-1] == pytest.approx(1e-4)
    assert ind.learning_rate(ind.IndicatorConfig(decay_epochs=0), 30) == 1e-3


def test_dead_initialisation_is_redrawn_and_counted():
    cfg = ind.IndicatorConfig(num_points=50, epochs=1, steps_per_epoch=1, delta=0.3, decay_epochs=1,
                              hessian_check_vectors=0)  # fmt: skip
    x, _ = one_hidden_layer_data(50, generator=torch.Generator().manual_seed(123))
    dead = [
        s
        for s in range(40)
        if not bool(
            OneHiddenLayerNet(4, generator=torch.Generator().manual_seed(s), delta=0.3)
            .unclipped(x)
            .any()
        )
    ]
    assert dead, "expected a dead initialisation among 40 seeds at δ = 0.3"
    rows = ind.train_and_measure(4, dead[0], 0.3, cfg)
    assert rows[0]["init_redraws"] >= 1 and rows[0]["frac_active"] > 0
    kept = ind.train_and_measure(4, dead[0], 0.3, ind.IndicatorConfig(**{
        **cfg.__dict__, "redraw_dead_init": False}))  # fmt: skip
    assert kept[0]["init_redraws"] == 0 and kept[0]["frac_active"] == 0.0


def test_sgd_option_and_determinism():
    cfg = ind.IndicatorConfig(num_points=60, epochs=2, steps_per_epoch=3, optimizer="sgd", lr=0.5, decay_epochs=2,
                              train_batch_size=10, hessian_check_vectors=0)  # fmt: skip
    a = ind.train_and_measure(6, 0, 1e-3, cfg)
    b = ind.train_and_measure(6, 0, 1e-3, cfg)
    assert [r["ratio"] for r in a] == [r["ratio"] for r in b]
    assert a[0]["train_loss"] != a[-1]["train_loss"]  # it moved
    assert [r["epoch"] for r in a] == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Configuration errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"widths": (0,)}, "even integer >= 2"),
        ({"widths": (32, 33)}, "even integer >= 2"),
        ({"widths": ()}, "at least 1 value"),
        ({"widths": (32, 32)}, "must not repeat"),
        ({"seeds": (-1,)}, r"seeds\[0\] must be >= 0"),
        ({"delta": 0.5}, r"\(0, 0.5\)"),
        ({"delta_sweep": (1e-3, 0.7)}, r"\(0, 0.5\)"),
        ({"optimizer": "rmsprop"}, "'adam' or 'sgd'"),
        ({"lr": 0.0}, "lr must be"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"decay_epochs": 40}, "decay_epochs"),
        ({"batch_size": 1000}, "no noise"),
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"dtype": "float16"}, "float32"),
        ({"threads": 0}, "threads"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        ind.IndicatorConfig.from_mapping(ind.IndicatorConfig(), changes).validate()


def test_unknown_config_key_lists_valid_ones():
    with pytest.raises(ValueError, match="valid keys: .*widths"):
        ind.IndicatorConfig.from_mapping(ind.IndicatorConfig(), {"width": [32]})


def test_cli_rejects_bad_width_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["indicator", "--widths", "32", "7", "--out", str(out)]) == 2
    assert "even integer >= 2" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_cli_smoke_profile_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["indicator", "--profile", "smoke", "--out", str(out), "--no-progress"]) == 0
    for name in ("results.json", "analysis.json", "config.json", "env.json", "metrics.jsonl",
                 "metrics.csv", "summary.md", "meta.json", "indicator.png", "indicator.svg",
                 "indicator_ratio.png", "prop2_alignment.svg"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["4", "8"]
    for r in results.values():
        for key in ("ratio_final", "tr_HS_final", "tr_HS_iso_final", "alignment_final"):
            assert math.isfinite(r[key])
        assert r["ratio_final"] == pytest.approx(r["tr_HS_final"] / r["tr_HS_iso_final"], rel=0.5)
        assert len(r["curves"]["epoch"]) == 4 == len(r["curves"]["ratio_mean"])
        assert r["num_valid_final"] == len(r["seeds_live"]) >= 1
        assert sorted(r["seeds_live"] + r["seeds_dead"]) == [0, 1]
    analysis = json.loads((out / "analysis.json").read_text())
    assert sorted(analysis["delta_sweep"]) == ["0.001", "0.1"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (2 * 2 + 1) * 4
    assert "Tr(HΣ)/Tr(HΣ̄)" in (out / "summary.md").read_text()
    # plot() redraws from saved results only; a rerun with the same config keeps finished runs.
    (out / "indicator.png").unlink()
    sgdnoise.figures.indicator.plot(out)
    assert (out / "indicator.png").is_file()
    before = (out / "metrics.jsonl").read_text()
    assert main(["indicator", "--profile", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_text() == before
    assert "h =    4" in capsys.readouterr().out
