"""Tests for sgdnoise.noise: every structure against its dense float64 definition, exact trace
matching, coupled randomness (ξ = L z exactly), Monte-Carlo covariance with principled tolerances,
multiplicative noise, and contract tests over every registered structure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian

import sgdnoise
from sgdnoise._utils import randn
from sgdnoise.noise import noise_class, safe_eigh

F64 = torch.float64
STRUCTURES = sgdnoise.noise_structures()
B = 4  # mini-batch size whose Σ_b is imitated
K = 4  # eigenpairs for leading / hessian in the tests
TIGHT = {"tol": 1e-10, "max_matvecs": 4000}  # Lanczos options for float64 comparisons


def make_problem(dtype: torch.dtype = F64, n: int = 30, seed: int = 0) -> sgdnoise.Problem:
    """A tanh MLP 5 → 6 → 3 (D = 57) with cross-entropy on n random points."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
    model = model.to(dtype)
    x = torch.randn((n, 5), generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x, y)


def options_for(name: str) -> dict:
    if name in ("leading", "hessian"):
        return {"k": K, **TIGHT}
    if name == "hessian_top1":
        return dict(TIGHT)
    if name == "const":
        return {"sigma": 0.3}
    return {}


def build(name: str, problem: sgdnoise.Problem, **extra) -> sgdnoise.NoiseModel:
    opts = {**options_for(name), **extra}
    if problem.dtype == torch.float32:
        opts = {k: v for k, v in opts.items() if k not in ("tol", "max_matvecs")}
    return sgdnoise.noise_model(name, problem, batch_size=B, **opts)


# --------------------------------------------------------------------------------------------
# Slow, obviously-correct float64 references
# --------------------------------------------------------------------------------------------


def reference(problem: sgdnoise.Problem, b: int = B, replacement: bool = True) -> dict:
    """Per-sample gradients by a Python loop, Σ_b by explicit centring, H by torch.func.hessian."""
    assert problem.dtype == F64, "the reference is float64 only"
    model, N = problem.model, problem.num_samples
    theta = problem.theta()
    names = problem.param_names

    def loss_of(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, torch.split(th, problem.param_numels), strict=True))
        params = {
            n: t.reshape(s) for (n, t), s in zip(params.items(), problem.param_shapes, strict=True)
        }
        out = functional_call(model, params, (x,))
        return F.cross_entropy(out, y)

    x, y = problem.inputs, problem.targets
    G = torch.stack([grad(loss_of)(theta, x[i : i + 1], y[i : i + 1]) for i in range(N)])
    C = G - G.mean(0)
    s = 1 / b if replacement else (N - b) / (b * (N - 1))
    Sigma = s * (C.T @ C) / N
    H = hessian(loss_of)(theta, x, y)
    return {"G": G, "C": C, "s": s, "Sigma": Sigma, "H": (H + H.T) / 2}


def expected_covariance(name: str, ref: dict, *, sigma: float = 0.3, k: int = K, match_trace=False):
    S, H = ref["Sigma"], ref["H"]
    D = S.shape[0]
    T = torch.trace(S)
    if name == "const":
        return sigma**2 * torch.eye(D, dtype=F64)
    if name == "dynamic":
        return T / D * torch.eye(D, dtype=F64)
    if name == "diag":
        return torch.diag(torch.diagonal(S))
    if name in ("full", "multiplicative"):
        return S
    if name == "leading":
        vals, vecs = torch.linalg.eigh(S)
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        if match_trace:
            vals = vals * T / vals.sum()
        return vecs @ torch.diag(vals) @ vecs.T
    vals, vecs = torch.linalg.eigh(H)
    vals, vecs = vals.flip(0), vecs.flip(1)
    if name == "hessian":
        lam = vals[:k].clamp_min(0)
        return T * vecs[:, :k] @ torch.diag(lam / lam.sum()) @ vecs[:, :k].T
    if name == "hessian_top1":
        return T * torch.outer(vecs[:, 0], vecs[:, 0])
    raise AssertionError(name)


@pytest.fixture(scope="module")
def problem64() -> sgdnoise.Problem:
    return make_problem()


@pytest.fixture(scope="module")
def ref64(problem64: sgdnoise.Problem) -> dict:
    return reference(problem64)


@pytest.fixture(scope="module")
def models64(problem64: sgdnoise.Problem) -> dict:
    return {name: build(name, problem64) for name in STRUCTURES}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# Registry and errors
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_structure_in_order():
    assert STRUCTURES == (
        "const",
        "dynamic",
        "diag",
        "leading",
        "hessian",
        "hessian_top1",
        "full",
        "multiplicative",
    )
    for name in STRUCTURES:
        assert noise_class(name).name == name


def test_unknown_structure_lists_valid_names(problem64):
    with pytest.raises(ValueError, match=r"unknown noise structure 'lead'.*const, dynamic, diag"):
        sgdnoise.noise_model("lead", problem64)


def test_unknown_option_lists_valid_options(problem64):
    with pytest.raises(TypeError, match=r"'leading' has no option\(s\) 'kk'.*k \(default 20\)"):
        sgdnoise.noise_model("leading", problem64, kk=3)
    with pytest.raises(TypeError, match=r"'diag' has no option.*valid options: none"):
        sgdnoise.noise_model("diag", problem64, sigma=1.0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("const", {"sigma": -1.0}, "sigma must be a finite number >= 0"),
        ("const", {"sigma": float("nan")}, "sigma must be a finite number >= 0"),
        ("leading", {"k": 0}, "k must be a positive int"),
        ("leading", {"solver": "svd"}, "solver must be one of"),
        ("leading", {"match_trace": 1}, "match_trace must be True or False"),
        ("hessian", {"on_nonconvergence": "loud"}, "on_nonconvergence must be one of"),
        ("hessian", {"tol": 2.0}, r"tol must be None or a number in \(0, 1\)"),
        ("hessian_top1", {"max_matvecs": 0}, "max_matvecs must be a positive int"),
        ("multiplicative", {"distribution": "poisson"}, "distribution must be one of"),
    ],
)
def test_bad_option_values(problem64, name, options, message):
    with pytest.raises(ValueError, match=message):
        sgdnoise.noise_model(name, problem64, **options)


@pytest.mark.parametrize("b", [0, 31, 2.0])
def test_bad_batch_size(problem64, b):
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, N\] = \[1, 30\]"):
        sgdnoise.noise_model("diag", problem64, batch_size=b)


def test_sample_rejects_bad_num_and_missing_generator(models64):
    m = models64["diag"]
    with pytest.raises(ValueError, match="num must be a non-negative int"):
        m.sample(-1, generator=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or an int seed"):
        m.sample(2, generator="0")
    # the package's randomness rule: no generator means seed 0
    assert torch.equal(m.sample(3), m.sample(3, seed=0))


# --------------------------------------------------------------------------------------------
# Definitions (dense float64) and trace matching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRUCTURES)
def test_covariance_matches_dense_definition(name, models64, ref64):
    cov = models64[name].covariance
    assert isinstance(cov, sgdnoise.LinearOperator)
    assert rel_err(cov.to_dense().double(), expected_covariance(name, ref64)) < 1e-8


@pytest.mark.parametrize("replacement", [True, False])
def test_full_covariance_batch_scaling(problem64, replacement):
    ref = reference(problem64, b=7, replacement=replacement)
    m = sgdnoise.noise_model("full", problem64, batch_size=7, replacement=replacement)
    assert rel_err(m.covariance.to_dense(), ref["Sigma"]) < 1e-10


def test_leading_match_trace_and_lanczos_solver(problem64, ref64):
    m = sgdnoise.noise_model("leading", problem64, batch_size=B, k=K, match_trace=True)
    want = expected_covariance("leading", ref64, match_trace=True)
    assert rel_err(m.covariance.to_dense(), want) < 1e-8
    lz = sgdnoise.noise_model("leading", problem64, batch_size=B, k=K, solver="lanczos", **TIGHT)
    assert lz.eigh_path == "lanczos"
    assert rel_err(lz.covariance.to_dense(), expected_covariance("leading", ref64)) < 1e-8
    assert torch.allclose(lz.eigenvalues, m.eigenvalues, rtol=1e-8)


def test_leading_rank_is_capped_by_rank_of_sigma():
    problem = make_problem(n=6)  # rank Σ_b ≤ N − 1 = 5
    m = sgdnoise.noise_model("leading", problem, batch_size=2, k=20)
    assert m.rank == 5 and m.unit_dim == 5
    ref = reference(problem, b=2)
    assert rel_err(m.covariance.to_dense(), ref["Sigma"]) < 1e-8  # top-5 of rank 5 is all of Σ_b


@pytest.mark.parametrize(
    "name", ["dynamic", "diag", "hessian", "hessian_top1", "full", "multiplicative"]
)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_trace_matches_sigma_exactly(name, dtype, problem64, models64):
    problem = problem64 if dtype == F64 else make_problem(torch.float32)
    m = models64[name] if dtype == F64 else build(name, problem)
    target = sgdnoise.gradient_noise_covariance(problem, B).trace()
    got = m.covariance.trace()
    assert got.dtype == dtype
    assert math.isclose(float(got), float(target), rel_tol=1e-12 if dtype == F64 else 2e-6)


def test_leading_trace_is_sum_of_top_eigenvalues(models64, ref64):
    vals = torch.linalg.eigvalsh(ref64["Sigma"]).flip(0)[:K]
    assert math.isclose(
        float(models64["leading"].covariance.trace()), float(vals.sum()), rel_tol=1e-10
    )


def test_hessian_degenerate_when_no_positive_curvature():
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.zeros(10, 1, dtype=F64)
    # concave: H = −2 XᵀX/N ≺ 0, so every eigenvalue is clipped to 0
    problem = sgdnoise.Problem(model, lambda out, t: -((out - t) ** 2).mean(), x, y)
    m = sgdnoise.noise_model("hessian", problem, batch_size=2, k=2)
    assert m.degenerate
    assert float(m.covariance.trace()) == 0.0
    assert torch.count_nonzero(m.sample(3, generator=0)) == 0


# --------------------------------------------------------------------------------------------
# Coupled randomness: ξ = L z exactly
# --------------------------------------------------------------------------------------------


def explicit_factor(name: str, m: sgdnoise.NoiseModel, ref: dict) -> torch.Tensor:
    """L with L Lᵀ = Cov(n), built in the test (eigenvectors taken from the model: sign-free)."""
    D = ref["Sigma"].shape[0]
    T = torch.trace(ref["Sigma"])
    if name == "const":
        return 0.3 * torch.eye(D, dtype=F64)
    if name == "dynamic":
        return (T / D).sqrt() * torch.eye(D, dtype=F64)
    if name == "diag":
        return torch.diag(torch.diagonal(ref["Sigma"]).sqrt())
    if name in ("full", "multiplicative"):
        return math.sqrt(ref["s"] / ref["C"].shape[0]) * ref["C"].T
    cov = m.covariance
    return cov.U * cov.s.sqrt()


@pytest.mark.parametrize("name", STRUCTURES)
def test_coupled_randomness_xi_equals_Lz(name, models64, ref64):
    m = models64[name]
    num = 7
    z = randn(
        (num, m.unit_dim), generator=torch.Generator().manual_seed(3), dtype=F64, device="cpu"
    )
    xi = m.sample(num, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xi, m.transform(z))  # bit-for-bit the same draw
    L = explicit_factor(name, m, ref64)
    assert torch.allclose(
        L @ L.T, expected_covariance(name, ref64), rtol=0, atol=1e-9 * float(L.norm() ** 2)
    )
    assert rel_err(xi, z @ L.T) < 1e-10


def test_multiplicative_gaussian_equals_full_for_the_same_z(models64):
    full, mult = models64["full"], models64["multiplicative"]
    z = randn(
        (5, full.unit_dim), generator=torch.Generator().manual_seed(1), dtype=F64, device="cpu"
    )
    assert rel_err(mult.transform(z), full.transform(z)) < 1e-12


# --------------------------------------------------------------------------------------------
# Monte Carlo: the empirical covariance converges to .covariance
# --------------------------------------------------------------------------------------------

#: z-score bound per check: a correct implementation fails one check with probability ≈ 4e-8.
Z_MAX = 5.5


def check_second_moments(
    samples: torch.Tensor, cov: torch.Tensor, directions: torch.Tensor
) -> None:
    """For each unit direction u: the mean of (uᵀn)² against uᵀΣu, and the mean of uᵀn against 0.

    The standard errors come from the samples themselves (CLT): se(mean (uᵀn)²) = sd((uᵀn)²)/√M,
    se(mean uᵀn) = √(uᵀΣu / M). For Gaussian noise M·mean((uᵀn)²)/uᵀΣu ~ χ²_M, whose sd 2M is
    what the empirical sd estimates. Tolerance Z_MAX standard errors (no ad-hoc slack).
    """
    M = samples.shape[0]
    var = torch.einsum("dj,de,ej->j", directions, cov, directions)
    null = var <= 1e-12 * var.max()  # directions outside the range of a low-rank covariance
    proj_null = samples.double() @ directions[:, null].double()
    if proj_null.numel():
        assert float(proj_null.abs().max()) <= 1e-6 * float(var.max().sqrt())
    directions, var = directions[:, ~null], var[~null]
    proj = samples.double() @ directions.double()  # [M, j]
    sq = proj**2
    z_var = (sq.mean(0) - var) / (sq.std(0) / math.sqrt(M))
    z_mean = proj.mean(0) / (var / M).sqrt()
    assert float(z_var.abs().max()) < Z_MAX, (z_var, var)
    assert float(z_mean.abs().max()) < Z_MAX, z_mean


def test_directions_and_tolerance_are_sensitive():
    """The check must reject a covariance off by 5% (so the tolerance is not vacuous)."""
    gen = torch.Generator().manual_seed(0)
    cov = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=F64))
    n = randn((40_000, 3), generator=gen, dtype=F64, device="cpu") * cov.diagonal().sqrt()
    dirs = torch.eye(3, dtype=F64)
    check_second_moments(n, cov, dirs)
    with pytest.raises(AssertionError):
        check_second_moments(n, cov * 1.05, dirs)


@pytest.mark.parametrize("name", STRUCTURES)
def test_monte_carlo_covariance(name, models64):
    m = models64[name]
    cov = m.covariance.to_dense().double()
    _, vecs = torch.linalg.eigh(cov)
    gen = torch.Generator().manual_seed(11)
    rand = torch.randn(cov.shape[0], 3, generator=gen, dtype=F64)
    dirs = torch.cat([vecs[:, -3:], rand / rand.norm(dim=0)], dim=1)
    samples = m.sample(40_000, generator=gen)
    check_second_moments(samples, cov, dirs)


def test_multiplicative_sgd_weights_monte_carlo(problem64):
    m = sgdnoise.noise_model("multiplicative", problem64, batch_size=B, distribution="sgd")
    assert not m.gaussian
    cov = m.covariance.to_dense()
    _, vecs = torch.linalg.eigh(cov)
    samples = m.sample(40_000, generator=torch.Generator().manual_seed(5))
    check_second_moments(samples, cov, vecs[:, -4:])


# --------------------------------------------------------------------------------------------
# Multiplicative noise
# --------------------------------------------------------------------------------------------


def test_gaussian_weights_have_mean_one_and_the_derived_covariance(problem64):
    m = sgdnoise.noise_model("multiplicative", problem64, batch_size=B)
    N = problem64.num_samples
    w = m.sample_weights(20_000, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(w.sum(1), torch.full((w.shape[0],), float(N), dtype=F64))  # Σ ε_i = 0
    emp = torch.cov(w.T, correction=0)
    want = m.scale * N * (torch.eye(N, dtype=F64) - 1.0 / N)
    # sd of an entry of a sample covariance ≈ √((Σ_ij² + Σ_ii Σ_jj)/M) ≤ √(2/M)·max diag
    assert float((emp - want).abs().max()) < Z_MAX * math.sqrt(2 / w.shape[0]) * float(
        want.diagonal().max()
    )


@pytest.mark.parametrize("replacement", [True, False])
def test_sgd_weights_give_exactly_the_minibatch_gradient(problem64, replacement):
    m = sgdnoise.noise_model(
        "multiplicative", problem64, batch_size=5, replacement=replacement, distribution="sgd"
    )
    gen = torch.Generator().manual_seed(4)
    w = m.sample_weights(1, generator=gen)[0]
    idx = torch.nonzero(w).flatten()
    counts = (w[idx] * 5 / problem64.num_samples).round().long()
    assert int(counts.sum()) == 5
    if not replacement:
        assert bool((counts == 1).all())
    batch = idx.repeat_interleave(counts)
    g_batch = problem64.gradient(indices=batch)
    g_w, _ = sgdnoise.weighted_gradients(problem64, w)
    assert rel_err(g_w, g_batch) < 1e-12
    n = m.noise_from_weights(w[None])[0]
    assert rel_err(problem64.gradient() + n, g_batch) < 1e-10


def test_weighted_gradients_matches_per_sample_sum(problem64, ref64):
    W = torch.randn(3, problem64.num_samples, generator=torch.Generator().manual_seed(0), dtype=F64)
    got, losses = sgdnoise.weighted_gradients(problem64, W)
    assert rel_err(got, W @ ref64["G"] / problem64.num_samples) < 1e-12
    assert torch.allclose(losses, problem64.per_sample_losses())


def test_multiplicative_covariance_is_lazy(problem64, monkeypatch):
    calls = []
    orig = problem64.per_sample_gradients
    monkeypatch.setattr(
        problem64, "per_sample_gradients", lambda *a, **k: calls.append(1) or orig(*a, **k)
    )
    m = sgdnoise.noise_model("multiplicative", problem64, batch_size=B)
    assert calls == []  # building it computes no Σ
    _ = m.covariance
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# Refresh, warm starts, per-sample reuse, eigh fallback
# --------------------------------------------------------------------------------------------


def test_refresh_follows_theta_and_warm_start_helps(problem64):
    problem = make_problem(seed=1)
    m = build("hessian", problem)
    cold = m.num_matvecs
    theta = problem.theta()
    problem.set_theta(
        theta
        + 1e-4 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    )
    m.refresh()
    fresh = build("hessian", problem)
    assert m.num_refreshes == 2
    assert rel_err(m.covariance.to_dense(), fresh.covariance.to_dense()) < 1e-7
    assert m.num_matvecs < cold  # started from the previous eigenvectors


@pytest.mark.parametrize("name", [n for n in STRUCTURES if noise_class(n).needs_per_sample])
def test_refresh_with_given_per_sample_gradients_skips_the_pass(name, problem64, monkeypatch):
    G, _ = sgdnoise.per_sample_gradients_and_losses(problem64)
    G0 = G.clone()
    ref = build(name, problem64)

    def boom(*a, **k):
        raise AssertionError("per-sample gradients recomputed")

    monkeypatch.setattr(problem64, "per_sample_gradients", boom)
    monkeypatch.setattr(problem64, "per_sample_gradients_and_losses", boom)
    m = (
        build(name, problem64, per_sample=G)
        if False
        else sgdnoise.noise_model(name, problem64, batch_size=B, per_sample=G, **options_for(name))
    )
    assert torch.equal(G, G0)  # not modified in place
    assert rel_err(m.covariance.to_dense(), ref.covariance.to_dense()) < 1e-8


def test_per_sample_gradients_and_losses_agree_with_problem(problem64, ref64):
    G, losses = sgdnoise.per_sample_gradients_and_losses(problem64)
    assert rel_err(G, ref64["G"]) < 1e-12
    assert torch.allclose(G.mean(0), problem64.gradient(), rtol=1e-12, atol=1e-14)
    assert torch.allclose(losses.mean(), problem64.loss())


def test_refresh_rejects_an_incompatible_problem(models64):
    other = make_problem(torch.float32)
    with pytest.raises(ValueError, match="same D, dtype and device"):
        models64["diag"].refresh(other)


def _failing_eigh(monkeypatch, failures: int) -> list:
    calls: list = []
    orig = torch.linalg.eigh

    def eigh(M):
        calls.append(M.device)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return orig(M)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


@pytest.mark.parametrize(("failures", "path"), [(0, "eigh"), (1, "cpu"), (2, "shifted")])
def test_leading_eigh_fallbacks(problem64, ref64, monkeypatch, failures, path):
    calls = _failing_eigh(monkeypatch, failures)
    m = sgdnoise.noise_model("leading", problem64, batch_size=B, k=K)
    assert m.eigh_path == path and len(calls) == failures + 1
    assert rel_err(m.covariance.to_dense(), expected_covariance("leading", ref64)) < 1e-7


def test_safe_eigh_shift_is_removed():
    A = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=F64))
    vals, _, path = safe_eigh(A)
    assert path == "eigh" and torch.allclose(vals, torch.tensor([0.0, 1.0, 3.0], dtype=F64))


# --------------------------------------------------------------------------------------------
# Contract tests over every registered structure
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem32() -> sgdnoise.Problem:
    return make_problem(torch.float32)


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_contract(name, dtype, models64, problem32):
    m = models64[name] if dtype == F64 else build(name, problem32)
    p = m.problem
    D = p.dim
    cov = m.covariance
    assert cov.shape == (D, D) and cov.dtype == dtype and cov.device == p.device
    assert cov.psd
    s1 = m.sample(5, generator=torch.Generator().manual_seed(9))
    s2 = m.sample(5, generator=torch.Generator().manual_seed(9))
    s3 = m.sample(5, generator=torch.Generator().manual_seed(10))
    assert s1.shape == (5, D) and s1.dtype == dtype and s1.device == p.device
    assert torch.equal(s1, s2)  # same seed ⇒ same noise
    assert not torch.equal(s1, s3)
    assert bool(torch.isfinite(s1).all())
    assert m.sample(0, generator=0).shape == (0, D)
    assert name in repr(m)
    # config round trip
    cfg = dict(m.config)
    again = sgdnoise.noise_model(cfg.pop("name"), p, **cfg)
    tol = 1e-8 if dtype == F64 else 2e-3
    assert rel_err(again.covariance.to_dense().double(), cov.to_dense().double()) < tol
    # the sample covariance is the operator's (scale check in float32 too, via the trace)
    if m.gaussian:
        assert m.unit_dim >= 1
        assert m.transform(torch.zeros(1, m.unit_dim, dtype=dtype)).abs().max() == 0
