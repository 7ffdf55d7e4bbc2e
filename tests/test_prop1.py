"""Tests for sgdnoise.experiments.prop1: the synthetic check of Proposition 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sgdnoise.figures.fashion
import sgdnoise.figures.indicator
import sgdnoise.figures.prop1
import sgdnoise.figures.toy
from sgdnoise._stats import loglog_slope
from sgdnoise.cli import main
from sgdnoise.experiments import prop1 as p1

F64 = torch.float64


def _dense(op) -> torch.Tensor:
    return op.to_dense(max_dim=op.shape[0])


def test_householder_basis_is_orthogonal_and_does_not_mutate():
    Q = p1.HouseholderBasis(30, 3, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(30, dtype=F64)
    M = Q.apply(eye)
    torch.testing.assert_close(M.T @ M, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(Q.apply_t(eye), M.T, rtol=0, atol=1e-13)
    assert torch.equal(eye, torch.eye(30, dtype=F64))  # input untouched
    assert not torch.allclose(M, eye)  # a genuine rotation
    torch.testing.assert_close(Q.column(4), M[:, 4])


@pytest.mark.parametrize("rest", p1.NOISE_RESTS)
@pytest.mark.parametrize(("D", "d", "k"), [(40, 0.75, 3), (60, 1.0, 1), (50, 0.55, 5)])
def test_construction_has_exactly_the_stated_spectrum_and_alignment(D, d, k, rest):
    a = 0.7
    inst = p1.make_instance(D, d, k, a, rest, generator=torch.Generator().manual_seed(1))
    H, S = _dense(inst.H), _dense(inst.Sigma)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-15)
    evals, evecs = torch.linalg.eigh(H)
    lam = inst.eigenvalues
    torch.testing.assert_close(evals.flip(0), lam, rtol=1e-12, atol=1e-14)
    # Condition 1: λ₁ = 1 > 0, k large eigenvalues, the tail strictly below λ₁ D^(−d).
    assert float(lam[0]) == 1.0
    assert bool((lam[:k] >= 0.5).all())
    assert float(lam[k:].max()) < float(lam[0]) * D ** (-d)
    # Σ is PSD with trace 1, diagonal in H's eigenbasis.
    assert float(torch.linalg.eigvalsh(S).min()) > -1e-14
    assert float(S.trace()) == pytest.approx(1.0, rel=1e-13)
    # Condition 2 with equality: u₁ᵀΣu₁ = a λ₁ Tr Σ / Tr H, u₁ from a dense eigh.
    u1 = evecs[:, -1]
    torch.testing.assert_close((u1 @ inst.u1).abs(), torch.tensor(1.0, dtype=F64))
    lhs = float(u1 @ S @ u1)
    rhs = a * float(evals[-1]) * float(S.trace()) / float(H.trace())
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # The closed form equals the dense computation, and Proposition 1's bounds hold.
    cf = p1.closed_form(inst.eigenvalues, inst.noise_eigenvalues)
    tr_hs = float(torch.trace(H @ S))
    assert cf["tr_HS"] == pytest.approx(tr_hs, rel=1e-12)
    assert cf["ratio"] == pytest.approx(
        tr_hs * D / (float(H.trace()) * float(S.trace())), rel=1e-12
    )
    assert cf["a"] == pytest.approx(a, rel=1e-13)
    assert cf["ratio"] >= inst.spectral_bound >= inst.bound
    assert inst.bound == pytest.approx(a * D / (k + D ** (1 - d)) ** 2)


def test_tail_rest_is_the_worst_case():
    """Putting all of Σ's remaining weight on the flattest direction minimises Tr(HΣ)."""
    inst = {
        r: p1.make_instance(200, 0.8, 4, 0.5, r, generator=torch.Generator().manual_seed(0))
        for r in p1.NOISE_RESTS
    }
    ratios = {
        r: p1.closed_form(i.eigenvalues, i.noise_eigenvalues)["ratio"] for r, i in inst.items()
    }
    assert ratios["tail"] < ratios["isotropic"] < ratios["hessian"]
    # ratio = aDλ₁²/Tr(H)² + D(1 − α)λ_D/Tr H exactly: the bound plus the flattest direction's share.
    t = inst["tail"]
    lam = t.eigenvalues
    alpha = 0.5 * float(lam[0] / lam.sum())
    extra = 200 * (1 - alpha) * float(lam[-1] / lam.sum())
    assert ratios["tail"] == pytest.approx(t.spectral_bound + extra, rel=1e-12)


def test_measure_instance_matches_closed_form():
    inst = p1.make_instance(120, 0.7, 4, 0.4, "hessian", generator=torch.Generator().manual_seed(2))
    cf = p1.closed_form(inst.eigenvalues, inst.noise_eigenvalues)
    dense = p1.measure_instance(inst, dense=True, generator=0)
    assert dense["ratio"] == pytest.approx(cf["ratio"], rel=1e-12)
    assert dense["a"] == pytest.approx(cf["a"], rel=1e-9)
    assert dense["lambda_1"] == pytest.approx(1.0, rel=1e-10)
    light = p1.measure_instance(inst, dense=False, generator=0)
    assert "ratio" not in light and light["a"] == pytest.approx(0.4, rel=1e-9)


def test_slopes_approach_the_bound_and_2d_minus_1():
    dims = [100, 1000, 10000]
    for d in (0.75, 1.0):
        ratios, bounds = [], []
        for D in dims:
            lam = p1.hessian_spectrum(D, d, 2)
            ratios.append(p1.closed_form(lam, p1.noise_spectrum(lam, 1.0, "tail"))["ratio"])
            bounds.append(1.0 * D / (2 + D ** (1 - d)) ** 2)
        slope = loglog_slope(dims, ratios)
        bound_slope = loglog_slope(dims, bounds)
        assert all(r >= b for r, b in zip(ratios, bounds, strict=True))
        assert abs(slope - bound_slope) < 0.03
        assert bound_slope >= 2 * d - 1 - 1e-12
    assert bound_slope == pytest.approx(1.0)  # d = 1: aD/(k + 1)² exactly


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"exponents": (0.5,)}, r"\(1/2, 1\]"),
        ({"exponents": (1.2,)}, r"\(1/2, 1\]"),
        ({"dims": (5, 100)}, "k \\+ 2"),
        ({"dims": (100,)}, "at least two"),
        ({"a": 0.0}, r"\(0, 1\]"),
        ({"tail_scale": 1.0}, "strictly below"),
        ({"noise_rests": ("flat",)}, "isotropic, hessian, tail"),
        ({"top_min": 0.001, "dims": (20, 40), "exponents": (0.6,)}, "must exceed"),
        ({"k": 0}, "k must be"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        p1.Prop1Config.from_mapping(p1.Prop1Config(), changes).validate()


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match="valid keys: .*exponents"):
        p1.Prop1Config.from_mapping(p1.Prop1Config(), {"d": [0.7]})


def test_cli_smoke_profile_end_to_end(tmp_path, capsys):
    out = tmp_path / "p1"
    assert main(["prop1", "--profile", "smoke", "--out", str(out), "--no-progress"]) == 0
    for name in ("results.json", "config.json", "env.json", "metrics.jsonl", "metrics.csv",
                 "summary.md", "prop1.png", "prop1.svg"):  # fmt: skip
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["all_bounds_hold"] is True
    assert res["max_numeric_rel_err"] < 1e-8
    assert sorted(res["exponents"]) == ["0.75", "1"]
    assert res["exponents"]["1"]["bound_slope"] == pytest.approx(1.0)
    assert all(math.isfinite(e["rests"]["isotropic"]["slope"]) for e in res["exponents"].values())
    (out / "prop1.png").unlink()
    sgdnoise.figures.prop1.plot(out)
    assert (out / "prop1.png").is_file()
    assert "bound holds everywhere: True" in capsys.readouterr().out
    assert main(["prop1", "--exponents", "0.4", "--out", str(tmp_path / "bad")]) == 2
    assert "(1/2, 1]" in capsys.readouterr().err
