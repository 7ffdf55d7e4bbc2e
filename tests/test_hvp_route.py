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
