"""The Hessian-product route is chosen from the model's structure (never from a timing): models
that convolve take double backward column by column, others forward-over-reverse, and either
route gives the dense float64 Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise


class _FunctionalConv(nn.Module):
    """A 1-d convolution called through ``F.conv1d`` (no ``nn.Conv*`` module to find)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, 3, dtype=torch.float64) * 0.5)
        self.head = nn.Linear(4 * 6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.conv1d(x, self.w)).flatten(1))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "conv2d": (
            nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
            ).double(),
            (1, 6, 6),
        ),
        "functional_conv1d": (_FunctionalConv(), (2, 8)),
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double(), (5,)),
    }


@pytest.mark.parametrize("name", ["conv2d", "functional_conv1d", "mlp"])
def test_route_follows_the_structure_and_products_are_exact(name):
    model, shape = _models()[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((12, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y, chunk_size=5)
    V = torch.randn(problem.dim, 3, generator=gen, dtype=torch.float64)
    got = sgdnoise.hessian(problem) @ V
    theta = problem.theta()

    def loss(t: torch.Tensor) -> torch.Tensor:
        return problem.batch_loss(t, x, y)

    dense = torch.autograd.functional.hessian(loss, theta)
    torch.testing.assert_close(got, dense @ V, rtol=1e-10, atol=1e-12)
    route = problem.routes.get("hvp", "forward-over-reverse")
    if name == "mlp":
        assert route == "forward-over-reverse"
    else:
        conv = "conv2d" if name == "conv2d" else "conv1d"
        assert route.startswith(f"double backward, column by column: the model convolves ({conv})")


def test_route_is_the_same_on_every_call_and_every_problem():
    """Deterministic: two problems on the same model take the same route and give bit-identical
    products (same seed ⇒ same numbers)."""
    model, shape = _models()["conv2d"]
    x = torch.randn((10, *shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(10) % 3
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    out = []
    for _ in range(2):
        problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
        out.append(problem.hvp(V))
        out.append(problem.hvp(V))
    assert all(torch.equal(o, out[0]) for o in out)


def test_a_conv_model_linear_in_theta_has_a_zero_hessian():
    """Double backward of a convolution keeps a graph without θ in it: H = 0, not an error."""
    x = torch.randn(8, 1, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64)
    problem = sgdnoise.Problem(
        nn.Conv1d(1, 1, 3).double(), lambda o, t: (o.flatten(1).mean(1) * t).mean(), x, y
    )
    V = torch.ones(problem.dim, 2, dtype=torch.float64)
    assert torch.equal(problem.hvp(V), torch.zeros_like(V))
    thetas = torch.stack([problem.theta(), problem.theta() + 1])
    assert torch.equal(problem.hvp_members(thetas, V.expand(2, -1, -1)), torch.zeros(2, *V.shape,
                       dtype=torch.float64))  # fmt: skip


class _Padded(nn.Module):
    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.e = nn.Embedding(7, 4, padding_idx=0)
        self.c = nn.Conv1d(4, 3, 3, padding=1) if conv else None
        self.fc = nn.Linear(15 if conv else 20, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.e(t)
        if self.c is not None:
            h = self.c(h.transpose(1, 2))
        return self.fc(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("conv", [False, True], ids=["embedding", "embedding+conv"])
def test_padding_seen_by_the_scan_wherever_it_is(conv):
    """nn.Embedding(padding_idx) reaches the scan as F.embedding: the padding token in sample 1
    only (outside the 16 samples of the symmetry check) still gets double backward, exact H."""
    torch.manual_seed(0)
    tok = torch.randint(1, 7, (40, 5))
    tok[1, 2] = 0
    y = torch.randint(0, 3, (40,))
    problem = sgdnoise.Problem(_Padded(conv).double(), F.cross_entropy, tok, y)
    V = torch.randn(problem.dim, 3, dtype=torch.float64)
    got = problem.hvp(V)
    H = torch.autograd.functional.hessian(lambda t: problem.batch_loss(t, tok, y), problem.theta())
    torch.testing.assert_close(got, H @ V, rtol=1e-10, atol=1e-12)
    assert problem.routes["hvp"].startswith("double backward")


def test_hvp_members_refuses_bad_input_in_one_line():
    problem = sgdnoise.Problem(
        nn.Linear(3, 2).double(), F.cross_entropy, torch.randn(6, 3, dtype=torch.float64),
        torch.arange(6) % 2,
    )  # fmt: skip
    th, D = problem.theta(), problem.dim
    with pytest.raises(ValueError, match="R ≥ 1"):
        problem.hvp_members(th[None][:0], torch.zeros(0, D, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        problem.hvp_members(th[None].float(), torch.zeros(1, D, 2))
    assert problem.hvp_members(th[None], torch.zeros(1, D, 0, dtype=torch.float64)).shape == (
        1, D, 0,
    )  # fmt: skip
