"""The route rules: which fast path runs on which model, the fallbacks, and the loss convention.

Each test checks the value against an independent float64 reference (a per-sample loop, dense
Hessians) *and* that the route recorded in ``Problem.routes`` is the one the rule says.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sgdnoise
from reference import dense_hessian, dense_hessian_reverse, loop_per_sample_gradients

F64 = torch.float64


def _problem(model: nn.Module, in_shape: tuple[int, ...], n: int = 6, seed: int = 0, **kw):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *in_shape), generator=gen)
    model(x)  # materialise lazy layers
    model = model.double()
    y = torch.randint(0, 3, (n,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x.double(), y, **kw)


CONVS = {
    "conv2d-stride-pad-dilation-groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (4, 9, 8),
    ),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4), (4, 6, 6)),
    "conv2d-same-dilated": (lambda: nn.Conv2d(2, 3, 4, padding="same", dilation=2), (2, 7, 6)),
    "conv1d-stride-dilation": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2),
        (3, 11),
    ),
    "conv3d-groups": (
        lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1, groups=2),
        (2, 4, 5, 4),
    ),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_layouts_use_the_hook_path_and_are_exact(name: str) -> None:
    build, shape = CONVS[name]
    model = nn.Sequential(build(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    problem = _problem(model, shape)
    G = problem.per_sample_gradients()
    assert problem.routes["per_sample"].startswith("layer hooks")
    torch.testing.assert_close(G, loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12)


class _InplaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h += self.b(torch.tanh(h))  # in place on the output of self.a
        return self.out(h)


class _FunctionalTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.enc(x))))
        return F.linear(h, self.enc.weight.t())[:, :3]  # enc.weight used outside its layer


class _SharedParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight  # one nn.Parameter registered under two names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


FALLBACKS = {
    "inplace-relu": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
        "modified in place",
    ),
    "inplace-residual": (_InplaceResidual, "modified in place"),
    "functional-tie": (_FunctionalTie, "do not add up"),
    "shared-parameter": (_SharedParameter, "tied weights"),
    "layer-called-twice": (_CalledTwice, "called 2 times"),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_models_that_break_the_hook_assumptions_take_the_general_path(name: str) -> None:
    build, reason = FALLBACKS[name]
    problem = _problem(build(), (4,))
    G = problem.per_sample_gradients()
    torch.testing.assert_close(G, loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12)
    assert problem.routes["per_sample"].startswith("vmap")
    assert reason in problem.routes["per_sample"]
    with pytest.raises(ValueError, match="method='hooks' cannot be used here"):
        problem.per_sample_gradients(method="hooks")
    # Σ's trace from the same gradients is exact too.
    C = G - G.mean(0)
    torch.testing.assert_close(
        sgdnoise.gradient_noise_covariance(problem, 2).trace(),
        (C * C).sum() / (2 * problem.num_samples),
    )


def test_lstm_falls_back_to_a_loop_for_per_sample_quantities_and_products() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.head = (
                nn.Embedding(7, 3),
                nn.LSTM(3, 4, batch_first=True),
                nn.Linear(4, 3),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(self.emb(x))[0][:, -1])

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (5, 4), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    problem = sgdnoise.Problem(Seq().double(), F.cross_entropy, x, y)
    G = problem.per_sample_gradients()
    torch.testing.assert_close(G, loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12)
    assert "loop over samples" in problem.routes["per_sample"]
    V = torch.randn(problem.dim, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(problem.hvp(V), dense_hessian(problem) @ V, rtol=1e-8, atol=1e-10)
    losses = problem.batched_loss(torch.stack([problem.theta(), problem.theta() * 0.9]))
    assert torch.isclose(losses[0], problem.loss())


def test_mse_hessian_products_fall_back_to_double_backward() -> None:
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    y = torch.randn(8, 2, generator=gen, dtype=F64)
    problem = sgdnoise.Problem(model, F.mse_loss, x, y)
    V = torch.randn(problem.dim, 4, generator=gen, dtype=F64)
    torch.testing.assert_close(problem.hvp(V), dense_hessian(problem) @ V, rtol=1e-10, atol=1e-12)
    assert "double backward" in problem.routes["hvp"]


def test_sum_reduction_is_refused_with_the_convention() -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    with pytest.raises(ValueError, match=r"\(= their sum\).*\*mean\* loss"):
        sgdnoise.Problem(nn.Linear(4, 3), nn.CrossEntropyLoss(reduction="sum"), x, y)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        sgdnoise.Problem(nn.Linear(4, 3), F.cross_entropy, x, y, reduction="sum")


def _token_problem(reduction: str, chunk_size: int | None):
    V, T = 5, 4
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Embedding(V, 3), nn.Tanh(), nn.Linear(3, V)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randint(0, V, (6, T), generator=gen)
    y = torch.randint(0, V, (6, T), generator=gen)
    y[3, 1:] = -100  # padding: sample 3 has one real token, sample 4 has two
    y[4, 2:] = -100

    def token_mean(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, V), t.reshape(-1), ignore_index=-100)

    def per_sequence(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tok = F.cross_entropy(out.transpose(1, 2), t, ignore_index=-100, reduction="none")
        mask = (t != -100).to(tok.dtype)
        return (tok * mask).sum(1) / mask.sum(1)

    loss = token_mean if reduction == "mean" else per_sequence
    return sgdnoise.Problem(model, loss, x, y, reduction=reduction, chunk_size=chunk_size)


def test_a_token_mean_over_padded_sequences_is_refused_on_first_use() -> None:
    problem = _token_problem("mean", None)  # the first three sequences are complete: accepted
    with pytest.raises(ValueError, match="not the mean of its per-sample losses.*reduction='none'"):
        problem.per_sample_gradients()


def test_per_sample_losses_make_every_quantity_independent_of_chunking() -> None:
    whole, chunked = _token_problem("none", None), _token_problem("none", 2)
    for a, b in [
        (whole.loss(), chunked.loss()),
        (whole.gradient(), chunked.gradient()),
        (whole.per_sample_gradients(), chunked.per_sample_gradients()),
        (
            sgdnoise.gradient_noise_covariance(whole, 2).trace(),
            sgdnoise.gradient_noise_covariance(chunked, 2).trace(),
        ),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    V = torch.randn(whole.dim, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(whole.hvp(V), chunked.hvp(V), rtol=1e-12, atol=1e-14)
    # and they agree with the reference: the mean over sequences of each sequence's token mean
    G = loop_per_sample_gradients(whole)
    torch.testing.assert_close(whole.gradient(), G.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(whole.hvp(V), dense_hessian(whole) @ V, rtol=1e-10, atol=1e-12)


def test_a_sample_with_every_target_ignored_is_named() -> None:
    V, T = 5, 3
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Embedding(V, 3), nn.Linear(3, V)).double()
    x, y = torch.randint(0, V, (5, T), generator=gen), torch.randint(0, V, (5, T), generator=gen)
    y[4] = -100
    problem = sgdnoise.Problem(
        model, lambda o, t: F.cross_entropy(o.reshape(-1, V), t.reshape(-1)), x, y
    )
    with pytest.raises(FloatingPointError, match=r"sample\(s\) 4 .*ignore_index") as info:
        sgdnoise.gradient_noise_covariance(problem, 2)
    assert "learning rate" not in str(info.value)


def test_cpu_attention_hessian_products_run_on_the_math_kernel() -> None:
    gen = torch.Generator().manual_seed(7)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * 8, 2)).double().eval()
    x = torch.randn(4, 3, 8, generator=gen, dtype=F64)
    problem = sgdnoise.Problem(model, F.cross_entropy, x, torch.randint(0, 2, (4,), generator=gen))
    V = torch.randn(problem.dim, 2, generator=gen, dtype=F64)
    with sdpa_kernel(SDPBackend.MATH):  # the reference needs second derivatives too
        H = dense_hessian_reverse(problem)
    torch.testing.assert_close(problem.hvp(V), H @ V, rtol=1e-8, atol=1e-10)


class _CubeOnce(torch.autograd.Function):
    """x³ whose backward is not differentiable (a wrong second derivative, without any error)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class _Cube(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CubeOnce.apply(x)


def test_a_wrong_second_derivative_is_refused_not_returned() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _Cube(), nn.Linear(4, 3))
    problem = _problem(model, (3,))
    with pytest.raises(RuntimeError, match="not symmetric|disagree with finite differences"):
        problem.hvp(torch.ones(problem.dim, 1, dtype=F64))
    with pytest.raises(RuntimeError):  # and every later product too
        sgdnoise.hessian(problem) @ torch.ones(problem.dim, dtype=F64)
    # per-sample gradients and ∇L (first order) stay available and exact
    torch.testing.assert_close(
        problem.per_sample_gradients(), loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12
    )


class _FunctionalPadding(nn.Module):
    """Token embedding by ``F.embedding(..., padding_idx=0)`` (no Embedding module to inspect)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
        self.o = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(F.embedding(x, self.w, padding_idx=0)).flatten(1))


def _late_padding_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "functional":
        return _FunctionalPadding().double()
    return nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Tanh(), nn.Flatten(),
                         nn.Linear(12, 3)).double()  # fmt: skip


@pytest.mark.parametrize("kind", ["module", "functional"])
@pytest.mark.parametrize("first_pad", [9, 0, 22])
def test_padding_tokens_anywhere_in_the_data_give_the_exact_hessian(kind, first_pad) -> None:
    """Embedding(padding_idx)'s forward-mode rule is wrong on padding tokens only: wherever they
    first appear (not only in the samples a route check looks at), H is exact and symmetric."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(1, 6, (23, 3), generator=gen)
    x[first_pad:, 0] = 0
    y = torch.randint(0, 3, (23,), generator=gen)
    problem = sgdnoise.Problem(_late_padding_model(kind), F.cross_entropy, x, y)
    H = sgdnoise.hessian(problem).to_dense()
    torch.testing.assert_close(H, dense_hessian_reverse(problem), rtol=1e-10, atol=1e-12)
    assert "double backward" in problem.routes["hvp"] and "padding_idx" in problem.routes["hvp"]
