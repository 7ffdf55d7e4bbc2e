"""Problem: flat parameters, loss, gradient, Hessian products, per-sample gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from conftest import make_problem
from reference import dense_hessian, loop_per_sample_gradients


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}


def test_flat_order_follows_trainable_parameters(kind: str) -> None:
    problem = make_problem(kind)
    trainable = [p for p in problem.model.parameters() if p.requires_grad]
    expected = torch.cat([p.detach().reshape(-1) for p in trainable])
    assert torch.equal(problem.theta(), expected)
    assert problem.dim == expected.numel()
    back = problem.unflatten(problem.theta())
    assert [t.shape for t in back.values()] == [p.shape for p in trainable]


def test_frozen_parameters_are_constants() -> None:
    problem = make_problem("frozen")
    total = sum(p.numel() for p in problem.model.parameters())
    assert problem.dim == total - 5  # the frozen bias of the first layer is not in θ
    assert "0.bias" not in problem.param_names


def test_loss_and_gradient_match_autograd(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype, chunk_size=7)  # uneven chunks: weighting by size matters
    model = problem.model
    loss = problem.loss_fn(model(problem.inputs), problem.targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)
    L, g = problem.loss_and_gradient()
    torch.testing.assert_close(L, loss.detach(), **_tol(dtype))
    torch.testing.assert_close(g, torch.cat([x.reshape(-1) for x in grads]), **_tol(dtype))
    assert L.dtype == dtype and g.dtype == dtype


def test_hvp_matches_dense_hessian(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype, chunk_size=10)
    H_ref = dense_hessian(make_problem(kind, torch.float64)).to(dtype)
    V = torch.randn(problem.dim, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    torch.testing.assert_close(problem.hvp(V), H_ref @ V, **_tol(dtype))
    torch.testing.assert_close(problem.hvp(V[:, :1]), H_ref @ V[:, :1], **_tol(dtype))


def test_hvp_of_one_vector_and_of_no_column(kind: str) -> None:
    problem = make_problem(kind)
    H_ref = dense_hessian(problem)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Hv = problem.hvp(v)
    assert Hv.shape == (problem.dim,)
    torch.testing.assert_close(Hv, H_ref @ v, **_tol(torch.float64))
    assert problem.hvp(v[:, None][:, :0]).shape == (problem.dim, 0)


def test_directions_and_points_of_another_kind_are_refused() -> None:
    """A float32 V on a float64 model would give float32 products, silently; a wrong shape gave
    an IndexError deep inside. Each is one ValueError naming what was expected."""
    problem = make_problem("mlp")
    D = problem.dim
    V = torch.ones(D, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"V must be torch.float64.*got torch.float32.*\.to\("):
        problem.hvp(V.float())
    with pytest.raises(
        ValueError, match=r"V must be torch.float64 on cpu.*got torch.float64 on meta"
    ):
        problem.hvp(V.to("meta"))
    with pytest.raises(ValueError, match=rf"V must have shape \[{D}\] or \[{D}, k\], got \[3\]"):
        problem.hvp(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"V must have shape.*got \[1, " + str(D) + r", 2\]"):
        problem.hvp(V[None])
    with pytest.raises(ValueError, match=r"V must have shape.*got list"):
        problem.hvp([1.0] * D)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="V must be torch.float64"):
        problem.output_jvp(V.float())
    theta32 = problem.theta().float()
    n = problem.num_samples
    for call in (
        lambda: problem.hvp(V, theta32),
        lambda: problem.hvp(V[:, :0], theta32),  # no column: still checked
        lambda: problem.loss(theta32),
        lambda: problem.gradient(theta32),
        lambda: problem.per_sample_losses(theta32),
        lambda: problem.per_sample_gradients(theta=theta32),
        lambda: problem.per_sample_gradients_and_losses(theta=theta32),
        lambda: problem.weighted_gradients(torch.ones(n, dtype=torch.float64), theta32),
        lambda: problem.output_jvp(V, theta32),
        lambda: problem.output_vjp(torch.ones(n, 3, 1, dtype=torch.float64), theta32),
    ):
        with pytest.raises(ValueError, match="theta must be torch.float64"):
            call()
    with pytest.raises(ValueError, match="theta must be torch.float64 on cpu.*on meta"):
        problem.loss(problem.theta().to("meta"))
    with pytest.raises(ValueError, match=rf"theta must be a flat vector of shape \[{D}\]"):
        problem.loss(problem.theta()[:-1])
    with pytest.raises(ValueError, match="hvp_members needs thetas and V on the model's device"):
        problem.hvp_members(problem.theta()[None].to("meta"), V[None].to("meta"))
    assert "hvp_members" not in problem.routes  # refused before any pass: no fallback recorded


def test_per_sample_gradients_match_loop(kind: str, dtype: torch.dtype) -> None:
    problem = make_problem(kind, dtype, chunk_size=5)
    G = sgdnoise.per_sample_gradients(problem)
    torch.testing.assert_close(G, loop_per_sample_gradients(problem), **_tol(dtype))
    idx = torch.tensor([3, 0, 3])
    torch.testing.assert_close(sgdnoise.per_sample_gradients(problem, idx), G[idx], **_tol(dtype))
    G2, losses = problem.per_sample_gradients_and_losses()
    torch.testing.assert_close(G2, G, **_tol(dtype))
    torch.testing.assert_close(losses, problem.per_sample_losses(), **_tol(dtype))
    torch.testing.assert_close(losses.mean(), problem.loss(), **_tol(dtype))
    # The mean of the per-sample gradients is the full gradient.
    torch.testing.assert_close(G.mean(0), problem.gradient(), **_tol(dtype))


def test_per_sample_gradients_into_a_buffer(kind: str) -> None:
    problem = make_problem(kind, chunk_size=7)
    G, losses = problem.per_sample_gradients_and_losses()
    buf = torch.full_like(G, float("nan"))
    G2, losses2 = problem.per_sample_gradients_and_losses(out=buf)
    assert G2 is buf
    torch.testing.assert_close(G2, G)
    torch.testing.assert_close(losses2, losses)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        problem.per_sample_gradients_and_losses(out=buf[:-1])
    with pytest.raises(ValueError, match="not contiguous"):
        problem.per_sample_gradients_and_losses(out=G.T.contiguous().T)


def test_batched_loss_matches_loop(kind: str) -> None:
    problem = make_problem(kind)
    thetas = problem.theta()[None] + 0.1 * torch.randn(
        3, problem.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    expected = torch.stack([problem.loss(t) for t in thetas])
    torch.testing.assert_close(problem.batched_loss(thetas), expected)


def test_problem_follows_model_updates() -> None:
    problem = make_problem("mlp")
    before = problem.loss()
    with torch.no_grad():
        next(problem.model.parameters()).add_(0.5)
    assert not torch.equal(before, problem.loss())


# ---------------------------------------------------------------- errors
def test_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"same number of samples.*\[5, 3\].*\[4\]"):
        sgdnoise.Problem(nn.Linear(3, 2), F.cross_entropy, torch.zeros(5, 3), torch.zeros(4))


def test_no_trainable_parameters() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sgdnoise.Problem(
            model, F.cross_entropy, torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
        )


def test_loss_not_scalar() -> None:
    # Refused when the Problem is built (the loss convention is checked on the first samples).
    with pytest.raises(ValueError, match="scalar mean loss.*reduction='mean'"):
        sgdnoise.Problem(
            nn.Linear(3, 2),
            lambda o, t: F.cross_entropy(o, t, reduction="none"),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
        )


def test_non_finite_loss_and_gradient() -> None:
    problem = make_problem("mlp")
    with torch.no_grad():
        next(problem.model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="the loss: not finite"):
        problem.loss()
    with pytest.raises(FloatingPointError, match="not finite"):
        problem.gradient()
    with pytest.raises(
        FloatingPointError,
        match=r"per-sample losses or gradients: not finite .*sample\(s\) 0, 1, 2",
    ):
        sgdnoise.per_sample_gradients(problem)


def test_batchnorm_and_dropout_in_training_mode_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    problem = sgdnoise.Problem(
        model, F.cross_entropy, torch.randn(6, 3), torch.zeros(6, dtype=torch.long)
    )
    with pytest.raises(RuntimeError, match=r"BatchNorm1d, training mode.*model.eval\(\)"):
        sgdnoise.per_sample_gradients(problem)
    with pytest.raises(RuntimeError, match="BatchNorm1d"):
        sgdnoise.hessian(problem) @ torch.randn(problem.dim)
    model.eval()
    assert sgdnoise.per_sample_gradients(problem).shape == (6, problem.dim)
    drop = sgdnoise.Problem(
        nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)),
        F.cross_entropy,
        torch.randn(6, 3),
        torch.zeros(6, dtype=torch.long),
    )
    with pytest.raises(RuntimeError, match="Dropout, training mode"):
        drop.loss()


def test_bad_indices_and_chunk_size() -> None:
    problem = make_problem("mlp", n=10)
    with pytest.raises(IndexError, match=r"\[0, 9\]"):
        sgdnoise.per_sample_gradients(problem, [0, 10])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sgdnoise.Problem(
            nn.Linear(3, 2),
            F.cross_entropy,
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            chunk_size=0,
        )


def test_inputs_follow_model_dtype() -> None:
    model = nn.Linear(3, 2).double()
    problem = sgdnoise.Problem(
        model, F.cross_entropy, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    )
    assert problem.inputs.dtype == torch.float64 and problem.targets.dtype == torch.long
    assert problem.dtype == torch.float64


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (3, 2)])
def test_per_sample_gradients_by_hooks_match_vmap(stride: int, padding: int) -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=stride, padding=padding),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    x = torch.randn(9, 2, 8, 7, generator=gen)
    model(x)  # materialise the lazy layer
    model = model.double()
    problem = sgdnoise.Problem(model, F.cross_entropy, x, torch.randint(0, 4, (9,), generator=gen))
    hooks = problem.per_sample_gradients(method="hooks")
    torch.testing.assert_close(
        hooks, problem.per_sample_gradients(method="vmap"), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(hooks, loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_hooks_fallbacks() -> None:
    class Shared(nn.Module):  # one layer called twice: hooks cannot separate the calls
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.lin(x)))

    gen = torch.Generator().manual_seed(0)
    problem = sgdnoise.Problem(
        Shared().double(),
        F.cross_entropy,
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.zeros(5, dtype=torch.long),
    )
    torch.testing.assert_close(problem.per_sample_gradients(), loop_per_sample_gradients(problem))
    off = problem.theta() + 0.1  # not the current parameters: vmap is used
    assert problem.per_sample_gradients(theta=off).shape == (5, problem.dim)
    with pytest.raises(ValueError, match=r"cannot be used here: layer lin \(Linear\) was called 2"):
        problem.per_sample_gradients(theta=off, method="hooks")
    plain = make_problem("mlp")
    with pytest.raises(ValueError, match="cannot be used here: theta is not the model's current"):
        plain.per_sample_gradients(theta=plain.theta() + 0.1, method="hooks")
    with pytest.raises(ValueError, match="method must be 'auto', 'vmap' or 'hooks'"):
        problem.per_sample_gradients(method="loop")


def test_hvp_of_a_loss_linear_in_theta_is_zero() -> None:
    model = nn.Linear(3, 1).double()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    problem = sgdnoise.Problem(model, lambda out, _: out.mean(), x, torch.zeros(10))
    for k in (1, 3):
        V = torch.ones(problem.dim, k, dtype=torch.float64)
        assert torch.equal(problem.hvp(V), torch.zeros_like(V))


def test_check_finite_screens_large_tensors_by_their_sum() -> None:
    from sgdnoise._utils import check_finite

    big = torch.ones(10_000)
    check_finite(big, "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[1234] = bad
        with pytest.raises(FloatingPointError, match=r"x: not finite \(1 of 10000"):
            check_finite(t, "x")
    # Finite entries whose float32 sum overflows are not an error (the exact check runs then).
    check_finite(torch.full((10_000,), 3e38), "x")


def test_output_jacobian_products_match_dense_jacobian() -> None:
    """output_jvp / output_vjp against the dense Jacobian of the outputs (torch.func.jacrev)."""
    problem = make_problem("mlp", n=6, seed=2)
    x, _ = problem.take(torch.arange(6))
    theta = problem.theta()
    J = torch.func.jacrev(lambda th: problem.outputs(th, x))(theta)  # [n, C, D]
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(problem.dim, 3, generator=gen, dtype=torch.float64)
    JV = problem.output_jvp(V)
    assert JV.shape == (*J.shape[:-1], 3)
    torch.testing.assert_close(JV, J @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.output_jvp(V[:, 0]), J @ V[:, 0], rtol=1e-10, atol=1e-12)
    U = torch.randn(*J.shape[:-1], 2, generator=gen, dtype=torch.float64)
    JtU = problem.output_vjp(U)
    torch.testing.assert_close(JtU, torch.einsum("ncd,nck->dk", J, U), rtol=1e-10, atol=1e-12)
    idx = torch.tensor([4, 1])
    torch.testing.assert_close(
        problem.output_jvp(V, indices=idx), (J @ V)[idx], rtol=1e-10, atol=1e-12
    )


def test_out_of_memory_is_a_memory_error_not_a_route_switch(monkeypatch) -> None:
    """A failed allocation must not be taken for a missing rule: switching routes for it would
    silently change the rounding of every later Hessian product."""
    import sgdnoise.problem._hessian as hess

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    problem = sgdnoise.Problem(model, torch.nn.functional.cross_entropy, x, y)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    before = problem.hvp(V)  # verified, forward-over-reverse
    mode = problem._hvp_mode

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr(hess, "jvp", no_memory)
    with pytest.raises(MemoryError, match="smaller memory_budget"):
        problem.hvp(V)
    assert problem._hvp_mode == mode  # no silent route switch
    monkeypatch.undo()
    assert torch.equal(problem.hvp(V), before)
