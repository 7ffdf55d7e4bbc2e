"""Tests for sgdnoise.models: the FashionMNIST CNN, the one-hidden-layer net, the 2-D toy loss."""

from __future__ import annotations

import math

import pytest
import torch

from sgdnoise.models import (
    FashionCNN,
    OneHiddenLayerNet,
    Toy2DModel,
    init_fashion_cnn_,
    one_hidden_layer_loss,
    sample_truncated_normal,
    toy2d_loss,
    toy2d_sample_grad,
    toy2d_sample_hessian,
    toy2d_sample_loss,
)

F64 = torch.float64


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --------------------------------------------------------------------------------------------
# Truncated normal
# --------------------------------------------------------------------------------------------


def test_truncated_normal_range_std_and_determinism():
    g = torch.Generator().manual_seed(0)
    x = sample_truncated_normal((200_000,), generator=g, std=0.02, dtype=F64)
    assert float(x.abs().max()) <= 0.04
    assert float(x.abs().max()) > 0.039  # the tails are actually reached
    # Std of N(0,1) truncated to [-2, 2]: sqrt(1 - 2·2·φ(2)/(2Φ(2) - 1)) ≈ 0.8796.
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    tstd = math.sqrt(1 - 4 * phi2 / z)
    assert abs(float(x.std()) - 0.02 * tstd) < 0.02 * 0.01
    assert abs(float(x.mean())) < 0.02 * 0.01
    y = sample_truncated_normal((200_000,), generator=torch.Generator().manual_seed(0), std=0.02)
    torch.testing.assert_close(y, x.float())
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        sample_truncated_normal((3,), generator=None)


# --------------------------------------------------------------------------------------------
# FashionCNN
# --------------------------------------------------------------------------------------------


def test_fashion_cnn_parameter_count_and_shapes():
    model = FashionCNN(generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in model.parameters()) == 11_330
    sizes = [p.numel() for p in model.parameters()]
    assert sizes == [250, 10, 2500, 10, 8000, 50, 500, 10]
    out = model(torch.zeros(4, 1, 28, 28))
    assert out.shape == (4, 10) and out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[n, 1, 28, 28\]"):
        model(torch.zeros(4, 28, 28))


def test_fashion_cnn_fast_pooling_without_autograd_gives_the_same_outputs():
    model = FashionCNN(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :, :10] = -1.0  # a constant background, as in FashionMNIST: tied pooling windows
    with torch.no_grad():
        fast = model(x)
    assert torch.equal(fast, model(x).detach())


def test_fashion_cnn_init_truncated_normal_and_deterministic():
    a = FashionCNN(generator=torch.Generator().manual_seed(7))
    b = FashionCNN(generator=torch.Generator().manual_seed(7))
    c = FashionCNN(generator=torch.Generator().manual_seed(8))
    fa = _flat(a)
    assert torch.equal(fa, _flat(b))
    assert not torch.equal(fa, _flat(c))
    assert float(fa.abs().max()) <= 0.04
    assert 0.016 < float(fa.std()) < 0.0192  # 0.02 · 0.8796 ≈ 0.0176
    for name, p in a.named_parameters():  # biases are truncated-normal too, not zero
        assert float(p.detach().abs().max()) > 0, name
    # Re-initialising in place with the same seed reproduces the weights.
    init_fashion_cnn_(c, generator=torch.Generator().manual_seed(7))
    assert torch.equal(_flat(c), fa)


def test_fashion_cnn_float64_and_global_rng_untouched():
    state = torch.get_rng_state()
    model = FashionCNN(generator=torch.Generator().manual_seed(0), dtype=F64)
    OneHiddenLayerNet(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert all(p.dtype == F64 for p in model.parameters())
    assert model(torch.zeros(2, 1, 28, 28, dtype=F64)).dtype == F64


def test_fashion_cnn_requires_explicit_generator_argument():
    with pytest.raises(TypeError):
        FashionCNN()  # generator is keyword-only and has no default
    model = FashionCNN(generator=None)  # explicit opt-out, e.g. before load_state_dict
    ref = FashionCNN(generator=torch.Generator().manual_seed(1))
    model.load_state_dict(ref.state_dict())
    assert torch.equal(_flat(model), _flat(ref))


# --------------------------------------------------------------------------------------------
# OneHiddenLayerNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [2, 32, 100])
def test_one_hidden_layer_structure(h):
    net = OneHiddenLayerNet(h, generator=torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())
    assert set(params) == {"weight", "bias"}
    assert params["weight"].shape == (h, 2) and params["bias"].shape == (h,)
    assert sum(p.numel() for p in net.parameters()) == 3 * h == net.num_params
    assert "output_weight" in dict(net.named_buffers())
    assert not net.output_weight.requires_grad
    expected = torch.cat([torch.ones(h // 2), -torch.ones(h // 2)])
    assert torch.equal(net.output_weight, expected)
    limit = math.sqrt(3.0 / (3 * h))
    flat = _flat(net)
    assert float(flat.abs().max()) <= limit


def test_one_hidden_layer_init_distribution_and_determinism():
    a = OneHiddenLayerNet(3000, generator=torch.Generator().manual_seed(5), dtype=F64)
    b = OneHiddenLayerNet(3000, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(_flat(a), _flat(b))
    flat = _flat(a)
    limit = math.sqrt(3.0 / 9000)
    # U(-L, L) has std L/√3.
    assert abs(float(flat.std()) - limit / math.sqrt(3)) < 0.03 * limit
    assert float(flat.abs().max()) > 0.99 * limit


def test_one_hidden_layer_forward_and_clipping():
    net = OneHiddenLayerNet(4, generator=None, delta=0.01, dtype=F64)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
        net.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    x = torch.tensor([[0.3, 0.1], [5.0, 0.0], [-5.0, 0.0], [0.0, 0.0]], dtype=F64)
    # f = relu(x1) + relu(x2) - relu(x1 + x2) - relu(0.5)
    f = x.clamp(min=0).sum(1) - (x.sum(1)).clamp(min=0) - 0.5
    out = net(x)
    assert out.shape == (4,)
    torch.testing.assert_close(out, f.clamp(0.01, 0.99))
    assert float(out.detach().min()) >= 0.01 and float(out.detach().max()) <= 0.99
    net2 = OneHiddenLayerNet(2, generator=None, dtype=F64)
    with torch.no_grad():
        net2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net2.bias.zero_()
    out2 = net2(torch.tensor([[0.5, 0.0], [100.0, 0.0], [-3.0, 0.0]], dtype=F64))
    torch.testing.assert_close(out2, torch.tensor([0.5, 1 - 1e-3, 1e-3], dtype=F64))


def test_one_hidden_layer_errors():
    for h in (3, 0, 1, -2):
        with pytest.raises(ValueError, match="hidden must be an even int >= 2"):
            OneHiddenLayerNet(h, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 0.5\)"):
        OneHiddenLayerNet(4, generator=torch.Generator(), delta=0.5)
    net = OneHiddenLayerNet(4, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        net(torch.zeros(3))


def test_one_hidden_layer_loss():
    out = torch.tensor([0.2, 0.9, 0.5])
    y = torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(
        one_hidden_layer_loss(out, y), torch.tensor((0.04 + 0.01 + 0.25) / 3)
    )
    with pytest.raises(ValueError, match="same shape"):
        one_hidden_layer_loss(out, y[:, None])


# --------------------------------------------------------------------------------------------
# 2-D toy loss
# --------------------------------------------------------------------------------------------

SHARP_H = torch.tensor([[110.0, 90.0], [90.0, 110.0]], dtype=F64)
FLAT_H = 2 * torch.eye(2, dtype=F64)


def test_toy2d_minima_and_hessians():
    x0 = torch.zeros(2, dtype=F64)
    sharp = torch.tensor([1.0, 1.0], dtype=F64)
    flat = torch.tensor([-1.0, -1.0], dtype=F64)
    assert float(toy2d_sample_loss(sharp, x0)) == 0.0
    assert float(toy2d_sample_loss(flat, x0)) == 0.0
    torch.testing.assert_close(toy2d_sample_grad(sharp, x0), torch.zeros(2, dtype=F64))
    torch.testing.assert_close(toy2d_sample_hessian(sharp, x0), SHARP_H)
    torch.testing.assert_close(toy2d_sample_hessian(flat, x0), FLAT_H)
    ev = torch.linalg.eigvalsh(SHARP_H)
    torch.testing.assert_close(ev, torch.tensor([20.0, 200.0], dtype=F64))
    # Autograd agrees at the minima.
    f = lambda w: toy2d_sample_loss(w, x0)  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(f)(sharp), SHARP_H)
    torch.testing.assert_close(torch.func.hessian(f)(flat), FLAT_H)
    # Minima move with the data point.
    x = torch.tensor([0.3, -0.2], dtype=F64)
    assert float(toy2d_sample_loss(x + 1.0, x)) == 0.0
    assert float(toy2d_sample_loss(x - 1.0, x)) == 0.0


def test_toy2d_analytic_derivatives_match_autograd():
    g = torch.Generator().manual_seed(0)
    w = 3.0 * torch.rand(40, 2, generator=g, dtype=F64) - 1.5
    x = 0.1 * torch.randn(40, 2, generator=g, dtype=F64)
    n_sharp = 0
    for wi, xi in zip(w, x, strict=True):
        f = lambda v, xi=xi: toy2d_sample_loss(v, xi)  # noqa: E731
        torch.testing.assert_close(
            toy2d_sample_grad(wi, xi), torch.func.grad(f)(wi), rtol=1e-12, atol=1e-12
        )
        hess = torch.func.hessian(f)(wi)
        torch.testing.assert_close(toy2d_sample_hessian(wi, xi), hess, rtol=1e-12, atol=1e-12)
        n_sharp += bool(torch.allclose(hess, SHARP_H))
    assert 0 < n_sharp < 40  # both branches were exercised


def test_toy2d_broadcasting():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 1, 2, generator=g, dtype=F64)
    x = torch.randn(7, 2, generator=g, dtype=F64)
    loss = toy2d_sample_loss(w, x)
    assert loss.shape == (5, 7)
    assert toy2d_sample_grad(w, x).shape == (5, 7, 2)
    assert toy2d_sample_hessian(w, x).shape == (5, 7, 2, 2)
    torch.testing.assert_close(loss[2, 3], toy2d_sample_loss(w[2, 0], x[3]))
    torch.testing.assert_close(toy2d_sample_grad(w, x)[4, 6], toy2d_sample_grad(w[4, 0], x[6]))
    with pytest.raises(ValueError, match="trailing dimension of size 2"):
        toy2d_sample_loss(torch.zeros(3), torch.zeros(2))


def test_toy2d_model_and_loss():
    g = torch.Generator().manual_seed(2)
    x = 0.01 * torch.randn(100, 2, generator=g, dtype=F64)
    model = Toy2DModel()
    assert [n for n, _ in model.named_parameters()] == ["w"]
    assert torch.equal(model.w.detach(), torch.ones(2, dtype=F64))
    out = model(x)
    assert out.shape == (100,)
    loss = toy2d_loss(out, torch.zeros(100))
    torch.testing.assert_close(loss, toy2d_sample_loss(model.w, x).mean())
    loss.backward()
    torch.testing.assert_close(model.w.grad, toy2d_sample_grad(model.w.detach(), x).mean(0))
    # Full-data Hessian at the sharp start is the sharp Hessian (all points on the sharp branch).
    params = {"w": model.w.detach()}

    def full_loss(p):
        return toy2d_loss(torch.func.functional_call(model, p, (x,)), None)

    hess = torch.func.hessian(full_loss)(params)["w"]["w"]
    torch.testing.assert_close(hess, SHARP_H)
    with pytest.raises(ValueError, match="shape"):
        Toy2DModel((1.0, 2.0, 3.0))
