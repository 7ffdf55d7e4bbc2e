"""GLD and the noise structures within the memory rule of ``gradient_noise_covariance`` (case 16).

Above ``MATERIALIZE_LIMIT`` numbers nothing may hold the ``[N, D]`` per-sample matrix: ∇L comes
from ``loss_and_gradient`` and the structure streams Σ_b (``full`` samples ``√(s/N) Cᵀz`` with a
weighted-gradient pass). The limit is lowered here (a module attribute read at call time) so that
a tiny model takes the streaming path, and the trajectories are compared with the materialised
path, which is itself checked against a float64 per-sample loop.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sgdnoise
from reference import dense_sigma, loop_per_sample_gradients
from sgdnoise.linalg import covariance

F64 = torch.float64
N = 40
LR = 0.2


def _problem(chunk_size: int | None = 8) -> sgdnoise.Problem:
    """tanh MLP 4 → 6 → 3 (D = 51) on N = 40 points, chunks of 8 samples."""
    gen = torch.Generator().manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
    model = model.double()
    x = torch.randn(N, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (N,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x, y, chunk_size=chunk_size)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns (every allocation goes through one)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shape: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), list(t.shape)
        return out


# Structures whose streaming draw is mathematically the same draw as the materialised one
# (leading with the Lanczos solver: the gram solver takes another route to the same subspace).
SAME_DRAW = {
    "const": {},
    "dynamic": {},
    "diag": {},
    "full": {},
    "hessian": {"k": 2},
    "hessian_top1": {},
    "leading": {"k": 2, "solver": "lanczos"},
    "multiplicative": {},
}


def _run(name: str, steps: int, refresh_every: int) -> tuple[torch.Tensor, sgdnoise.GLD]:
    problem = _problem()
    opt = sgdnoise.GLD(
        problem.model.parameters(),
        LR,
        noise=name,
        problem=problem,
        batch_size=5,
        refresh_every=refresh_every,
        generator=0,
        **SAME_DRAW[name],
    )
    thetas = [problem.theta()]
    for _ in range(steps):
        opt.step()
        thetas.append(problem.theta())
    return torch.stack(thetas), opt


def test_the_default_limit_is_the_documented_one() -> None:
    assert covariance.MATERIALIZE_LIMIT == 2**27


CASES = [(name, 1, 2) for name in sorted(SAME_DRAW)] + [("diag", 2, 3), ("full", 2, 3)]


@pytest.mark.parametrize(("name", "refresh_every", "steps"), CASES)
def test_streaming_gld_follows_the_materialised_trajectory(
    name: str, refresh_every: int, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, opt_mat = _run(name, steps, refresh_every)
    if sgdnoise.noise.noise_class(name).needs_per_sample:
        assert opt_mat._per_sample_buffer is not None  # below the limit: one [N, D] buffer
    monkeypatch.setattr(covariance, "MATERIALIZE_LIMIT", N * 51 - 1)
    spy = _LargestTensor()
    with spy:
        streamed, opt = _run(name, steps, refresh_every)
    assert opt._per_sample_buffer is None
    assert spy.largest < N * 51, (spy.largest, spy.shape)  # no [N, D] tensor anywhere
    cov = getattr(opt.noise, "_cov", None) if name == "multiplicative" else None
    if isinstance(opt.noise.covariance, sgdnoise.GradientNoiseCovariance) and cov is None:
        assert opt.noise.covariance.centered is None
    torch.testing.assert_close(streamed, reference, rtol=1e-10, atol=1e-12)


def test_the_spy_sees_the_materialised_buffer() -> None:
    spy = _LargestTensor()
    with spy:
        _run("diag", 1, 1)
    assert spy.largest >= N * 51  # the detector works: the default path does hold [N, D]


def test_full_streaming_draw_equals_the_float64_factor_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = _problem()
    b = 5
    G = loop_per_sample_gradients(problem)
    C = G - G.mean(0)
    z = torch.randn(3, N, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = math.sqrt(1 / (b * N)) * (z @ C)  # rows √(s/N) Cᵀ z, s = 1/b
    monkeypatch.setattr(covariance, "MATERIALIZE_LIMIT", 0)
    nm = sgdnoise.noise_model("full", problem, b)
    assert isinstance(nm.covariance, sgdnoise.GradientNoiseCovariance)
    assert nm.covariance.centered is None
    torch.testing.assert_close(nm.transform(z), expected, rtol=1e-10, atol=1e-13)
    # and the streamed covariance is Σ_b
    S = dense_sigma(problem, b)
    V = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(nm.covariance @ V, S @ V, rtol=1e-10, atol=1e-13)


def test_lowering_the_limit_mid_run_frees_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _problem()
    opt = sgdnoise.GLD(
        problem.model.parameters(), LR, noise="full", problem=problem, batch_size=5, generator=0
    )
    opt.step()
    assert opt._per_sample_buffer is not None
    monkeypatch.setattr(covariance, "MATERIALIZE_LIMIT", 0)
    opt.step()
    assert opt._per_sample_buffer is None
    assert opt.noise.covariance.centered is None


def test_leading_gram_above_the_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _problem()
    monkeypatch.setattr(covariance, "MATERIALIZE_LIMIT", 100)
    with pytest.raises(ValueError, match=r"solver='gram' needs the \[N, D\] = \[40, 51\]") as info:
        sgdnoise.noise_model("leading", problem, 5, k=2, solver="gram")
    assert "MATERIALIZE_LIMIT = 100" in str(info.value) and "\n" not in str(info.value)
    auto = sgdnoise.noise_model("leading", problem, 5, k=2)  # auto: Lanczos on the stream
    assert auto.eigh_path == "lanczos"
