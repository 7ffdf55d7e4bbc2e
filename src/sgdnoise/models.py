"""The paper's models: the FashionMNIST CNN, the one-hidden-layer net of Prop. 2, the 2-D toy loss.

All random initialisation goes through an explicit ``torch.Generator``; modules are built with
:func:`torch.nn.utils.skip_init` so that constructing them does not consume PyTorch's global RNG.
Draws happen on the generator's device (normally CPU) and are then copied into the parameters, so
a seed gives the same initial weights on every device.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

__all__ = [
    "FashionCNN",
    "OneHiddenLayerNet",
    "Toy2DModel",
    "init_fashion_cnn_",
    "one_hidden_layer_loss",
    "sample_truncated_normal",
    "toy2d_loss",
    "toy2d_sample_grad",
    "toy2d_sample_hessian",
    "toy2d_sample_loss",
    "toy2d_statistics",
]


def _check_generator(generator: object, what: str = "generator") -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{what} must be a torch.Generator, got {type(generator).__name__}. Pass e.g. "
            f"{what}=torch.Generator().manual_seed(0); sgdnoise never uses the global RNG."
        )
    return generator


# --------------------------------------------------------------------------------------------
# Truncated normal
# --------------------------------------------------------------------------------------------


def sample_truncated_normal(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator,
    std: float = 1.0,
    truncation: float = 2.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Zero-mean normal draws truncated to ``[-truncation·std, truncation·std]``.

    This is the distribution of TensorFlow's ``tf.truncated_normal`` (which re-draws values more
    than 2 standard deviations from the mean). Note that ``std`` is the std of the *untruncated*
    normal; the truncated draws have a smaller std (``≈ 0.880·std`` for a ±2σ cut).

    Sampling is by inverse CDF in float64: ``u ~ U(Φ(-t), Φ(t))``, ``x = std · Φ⁻¹(u)``. One
    uniform per entry, so the generator advances by a fixed amount (unlike rejection sampling).

    Args:
        shape: output shape.
        generator: source of randomness; draws are made on its device.
        std: standard deviation of the underlying normal (> 0).
        truncation: cut-off in units of ``std`` (> 0).
        dtype: floating dtype of the result.
        device: device of the result.
    """
    generator = _check_generator(generator)
    if not (std > 0 and truncation > 0):
        raise ValueError(f"std and truncation must be positive, got std={std}, {truncation=}.")
    lo = 0.5 * math.erfc(truncation / math.sqrt(2.0))  # Φ(-t)
    hi = 1.0 - lo
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=generator.device)
    x = torch.special.ndtri(lo + (hi - lo) * u)
    # Guard against rounding at the ends of the float64 CDF; the clamp is a no-op in practice.
    x = x.clamp(-truncation, truncation) * std
    return x.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# FashionMNIST CNN
# --------------------------------------------------------------------------------------------


class FashionCNN(nn.Module):
    """The paper's FashionMNIST network (released ``FashionMNIST/model.py``; 11,330 parameters).

    Layout (NCHW input ``[n, 1, 28, 28]``, "valid" convolutions)::

        conv 5×5, 1→10    [n,10,24,24]  → maxpool 2 [n,10,12,12] → ReLU     (260 params)
        conv 5×5, 10→10   [n,10, 8, 8]  → maxpool 2 [n,10, 4, 4] → ReLU     (2,510 params)
        flatten 160 → Linear 160→50 → ReLU                                  (8,050 params)
        Linear 50→10 (logits for softmax cross-entropy)                     (510 params)

    The flatten order is (C, H, W) here and (H, W, C) in the TensorFlow original; this only
    permutes the rows of the first linear layer's weight and changes nothing we measure.

    Args:
        generator: if a generator, every weight and bias is drawn from the truncated normal
            (:func:`init_fashion_cnn_`). ``None`` leaves the parameters *uninitialised memory* (for
            loading a state dict); it must be passed explicitly so that the choice is visible.
        std: std of the truncated-normal initialisation (the paper's 0.02).
        dtype: parameter dtype.
        device: parameter device.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        generator: torch.Generator | None,
        std: float = 0.02,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.conv1 = skip_init(nn.Conv2d, 1, 10, kernel_size=5, **kw)
        self.conv2 = skip_init(nn.Conv2d, 10, 10, kernel_size=5, **kw)
        self.fc1 = skip_init(nn.Linear, 4 * 4 * 10, 50, **kw)
        self.fc2 = skip_init(nn.Linear, 50, self.num_classes, **kw)
        if generator is not None:
            init_fashion_cnn_(self, generator=generator, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, 10]`` for images ``[n, 1, 28, 28]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(
                f"FashionCNN expects images of shape [n, 1, 28, 28], got {list(x.shape)}. "
                "Add the channel axis with x.unsqueeze(1) if needed."
            )
        # Without autograd (evaluation, expected sharpness) the 2×2 max pooling is taken as the
        # elementwise maximum of strided slices: the same values, ~10× faster on CPU than
        # max_pool2d's indexed kernel. With autograd, max_pool2d (whose gradient goes to one
        # element of a tied window).
        pool = F.max_pool2d if torch.is_grad_enabled() else _max_pool_2x2
        x = F.relu(pool(self.conv1(x), 2))
        x = F.relu(pool(self.conv2(x), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _max_pool_2x2(z: torch.Tensor, kernel_size: int = 2) -> torch.Tensor:
    """``F.max_pool2d(z, 2)`` for even height and width, as maxima of strided slices."""
    assert kernel_size == 2 and z.shape[-1] % 2 == 0 and z.shape[-2] % 2 == 0
    rows = torch.maximum(z[..., 0::2], z[..., 1::2])
    return torch.maximum(rows[..., 0::2, :], rows[..., 1::2, :])


@torch.no_grad()
def init_fashion_cnn_(
    model: nn.Module, *, generator: torch.Generator, std: float = 0.02
) -> nn.Module:
    """Set every parameter (weights *and* biases) to truncated-normal draws, in place.

    Each entry is ``N(0, std²)`` truncated at ±2·std, as ``tf.truncated_normal(stddev=0.02)`` in
    the released code. Parameters are filled in ``model.named_parameters()`` order, each from one
    block of draws, so a seed fixes the whole initialisation.

    Args:
        model: the module to initialise (typically a :class:`FashionCNN`).
        generator: source of randomness.
        std: std of the underlying normal.

    Returns:
        ``model`` (for chaining).
    """
    generator = _check_generator(generator)
    for _, param in model.named_parameters():
        param.copy_(
            sample_truncated_normal(
                param.shape, generator=generator, std=std, dtype=param.dtype, device=param.device
            )
        )
    return model


# --------------------------------------------------------------------------------------------
# One-hidden-layer network of Proposition 2
# --------------------------------------------------------------------------------------------


class OneHiddenLayerNet(nn.Module):
    """Two inputs → ``h`` ReLU units → fixed ±1 output weights → clip (Proposition 2, Fig. 4).

    ``f(x) = Σ_j a_j · relu(W_j · x + b_j)`` with ``a_j = +1`` for ``j < h/2`` and ``-1`` otherwise
    (a buffer, not trained), and the output is ``φ(f) = min(max(f, δ), 1 − δ)`` (``torch.clamp``;
    its gradient is 0 where the clip is active, like ``tf.clip_by_value``). The trainable
    parameters are ``weight [h, 2]`` and ``bias [h]``, ``D = 3h`` in all. The loss is the mean
    squared error, see :func:`one_hidden_layer_loss`.

    Initialisation follows the released code, where ``W`` and ``b`` live in one flat vector of
    length ``D`` with TF's Glorot-uniform initializer; for a 1-D variable fan-in = fan-out = D, so
    every entry is ``U(-√(3/D), √(3/D))``. The flat vector is split as ``weight = flat[:2h]``
    (row-major ``[h, 2]``) and ``bias = flat[2h:]``; the entries are i.i.d., so the split order does
    not change the distribution.

    Args:
        hidden: number of hidden units ``h`` (even, ≥ 2).
        generator: source of randomness for the initialisation; ``None`` leaves the parameters
            uninitialised (for loading a state dict) and must be passed explicitly.
        delta: clipping margin ``δ ∈ (0, 1/2)`` (the released script's default 1e-3).
        dtype: parameter dtype.
        device: parameter device.
    """

    def __init__(
        self,
        hidden: int,
        *,
        generator: torch.Generator | None,
        delta: float = 1e-3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 2 or hidden % 2:
            raise ValueError(
                f"hidden must be an even int >= 2 (half the units get output weight +1, half -1), "
                f"got {hidden!r}. Use e.g. hidden=100 (the released code's default)."
            )
        if not 0.0 < delta < 0.5:
            raise ValueError(f"delta must lie in (0, 0.5) so that δ < 1 − δ, got {delta}.")
        self.hidden = hidden
        self.delta = float(delta)
        self.weight = nn.Parameter(torch.empty(hidden, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device))
        signs = torch.ones(hidden, dtype=dtype, device=device)
        signs[hidden // 2 :] = -1.0
        self.register_buffer("output_weight", signs)
        if generator is not None:
            self.reset_parameters(generator=generator)

    @property
    def num_params(self) -> int:
        """``D = 3h``."""
        return 3 * self.hidden

    @torch.no_grad()
    def reset_parameters(self, *, generator: torch.Generator) -> None:
        """Glorot-uniform on the flat vector: every entry ``U(±√(3/D))``, ``D = 3h``."""
        generator = _check_generator(generator)
        d = self.num_params
        limit = math.sqrt(3.0 / d)
        flat = torch.rand(d, generator=generator, dtype=torch.float64, device=generator.device)
        flat = (2.0 * flat - 1.0) * limit
        flat = flat.to(dtype=self.weight.dtype, device=self.weight.device)
        self.weight.copy_(flat[: 2 * self.hidden].view(self.hidden, 2))
        self.bias.copy_(flat[2 * self.hidden :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``φ(f(x))`` of shape ``[n]`` for inputs ``[n, 2]``."""
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(
                f"OneHiddenLayerNet expects inputs of shape [n, 2], got {list(x.shape)}."
            )
        out_w = cast(torch.Tensor, self.output_weight)  # a buffer
        f = F.relu(F.linear(x, self.weight, self.bias)) @ out_w
        return torch.clamp(f, self.delta, 1.0 - self.delta)

    def unclipped(self, x: torch.Tensor) -> torch.Tensor:
        """Mask ``[N]`` of the inputs whose output is not clipped, ``δ < f(x) < 1 − δ`` (the only
        ones with a nonzero gradient)."""
        with torch.no_grad():
            out = self(x)
        return (out > self.delta) & (out < 1.0 - self.delta)

    def redraw_while_dead(
        self, x: torch.Tensor, *, generator: torch.Generator, max_redraws: int
    ) -> int:
        """Redraw the parameters from ``generator`` while every output on ``x`` is clipped.

        A network whose outputs are all clipped has zero gradient and can never train.

        Returns:
            How many times the parameters were redrawn (0: the first draw has an unclipped output).

        Raises:
            RuntimeError: each of ``max_redraws + 1`` draws clips every output.
        """
        redraws = 0
        while not bool(self.unclipped(x).any()):
            if redraws == max_redraws:
                raise RuntimeError(
                    f"every one of {max_redraws + 1} initialisations of width {self.hidden} with "
                    f"δ = {self.delta} clips all {x.shape[0]} outputs (zero gradient); lower δ or "
                    "change the seed"
                )
            self.reset_parameters(generator=generator)
            redraws += 1
        return redraws

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, D={self.num_params}, delta={self.delta}"


def one_hidden_layer_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``mean_i (φ(f(x_i)) − y_i)²`` (no 1/2, like TF's ``mean_squared_error``).

    Shapes must match exactly: a ``[n]`` output against ``[n, 1]`` targets would silently broadcast
    to an ``[n, n]`` difference, so it is refused.
    """
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs and targets must have the same shape, got {list(outputs.shape)} and "
            f"{list(targets.shape)}. OneHiddenLayerNet returns [n]; pass targets of shape [n]."
        )
    return ((outputs - targets) ** 2).mean()


# --------------------------------------------------------------------------------------------
# 2-D toy loss (Sec. 3.1 / Fig. 2)
# --------------------------------------------------------------------------------------------

_C = math.cos(math.pi / 4)
_S = _C


def _toy2d_branches(
    w: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (u, v, q_s, q_f) with (a, b) = w − x − (1, 1) for q_s and w − x + (1, 1) for q_f."""
    if w.shape[-1:] != (2,) or x.shape[-1:] != (2,):
        raise ValueError(
            f"w and x must have a trailing dimension of size 2, got {list(w.shape)} and "
            f"{list(x.shape)}."
        )
    d = w - x
    a_s, b_s = d[..., 0] - 1.0, d[..., 1] - 1.0
    u = _C * a_s - _S * b_s
    v = _C * a_s + _S * b_s
    q_s = 10.0 * u**2 + 100.0 * v**2
    a_f, b_f = d[..., 0] + 1.0, d[..., 1] + 1.0
    q_f = a_f**2 + b_f**2
    return u, v, q_s, q_f


def toy2d_sample_loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of the 2-D toy: ``ℓ(w; x) = min{q_s(w − x − (1,1)), q_f(w − x + (1,1))}``.

    ``q_s(a, b) = 10(c·a − s·b)² + 100(c·a + s·b)²`` with ``c = s = cos(π/4)`` is a sharp quadratic
    (Hessian ``[[110, 90], [90, 110]]``: eigenvalue 200 along (1,1)/√2, 20 along (1,−1)/√2) centred
    at ``x + (1, 1)``; ``q_f(a, b) = a² + b²`` is a flat one (Hessian ``2I``) centred at
    ``x − (1, 1)``. The full loss is the mean over the data points.

    Args:
        w: parameters ``[..., 2]``.
        x: data points ``[..., 2]``; leading dimensions broadcast against ``w``'s.

    Returns:
        ``ℓ`` with the broadcast leading shape.
    """
    _, _, q_s, q_f = _toy2d_branches(w, x)
    return torch.minimum(q_s, q_f)


def toy2d_sample_grad(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Analytic ``∇_w ℓ(w; x)``, shape ``[..., 2]`` (broadcast).

    The gradient of the active branch: ``20u·(c, −s) + 200v·(c, s)`` where q_s ≤ q_f (with
    ``u = c·a − s·b``, ``v = c·a + s·b``), else ``2·(a, b)`` of the flat branch. On the measure-zero
    set q_s = q_f the sharp branch is used (autograd's ``minimum`` splits the gradient there).
    """
    u, v, q_s, q_f = _toy2d_branches(w, x)
    d = w - x
    g_sharp = torch.stack((20.0 * _C * u + 200.0 * _C * v, -20.0 * _S * u + 200.0 * _S * v), -1)
    g_flat = 2.0 * (d + 1.0)
    return torch.where((q_s <= q_f).unsqueeze(-1), g_sharp, g_flat)


def toy2d_sample_hessian(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Analytic ``∇²_w ℓ(w; x)``, shape ``[..., 2, 2]``: ``[[110, 90], [90, 110]]`` or ``2I``.

    Each branch is quadratic, so the Hessian is constant on each side of the switch q_s = q_f
    (sharp branch on ties, as in :func:`toy2d_sample_grad`).
    """
    _, _, q_s, q_f = _toy2d_branches(w, x)
    dtype = torch.promote_types(w.dtype, x.dtype)
    h_sharp = torch.tensor([[110.0, 90.0], [90.0, 110.0]], dtype=dtype, device=w.device)
    h_flat = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=dtype, device=w.device)
    return torch.where((q_s <= q_f)[..., None, None], h_sharp, h_flat)


def toy2d_statistics(
    w: torch.Tensor, X: torch.Tensor, *, need_hessian: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean gradient ``[R, 2]``, centred per-sample gradients ``[R, N, 2]``, mean Hessian ``[R, 2, 2]``.

    ``w`` ``[R, 2]`` (one point per run), ``X`` ``[R, N, 2]`` (each run's data). A fused version
    of :func:`toy2d_sample_grad` / :func:`toy2d_sample_hessian` over R runs at once (same branch rule:
    the sharp branch where ``q_s ≤ q_f``): each per-sample Hessian is ``H_s = [[110, 90],
    [90, 110]]`` or ``2I``, so the mean Hessian is ``f H_s + (1 − f) 2I`` with f the fraction of
    samples on the sharp branch — no ``[R, N, 2, 2]`` tensor.
    """
    d = w[:, None, :] - X
    d0, d1 = d[..., 0], d[..., 1]
    a, b = d0 - 1.0, d1 - 1.0
    u = _C * (a - b)
    v = _C * (a + b)
    sharp = 10.0 * u * u + 100.0 * v * v <= (d0 + 1.0) ** 2 + (d1 + 1.0) ** 2
    g_sharp = torch.stack((20.0 * _C * u + 200.0 * _C * v, -20.0 * _C * u + 200.0 * _C * v), -1)
    G = torch.where(sharp[..., None], g_sharp, 2.0 * (d + 1.0))
    gbar = G.mean(1)
    H = None
    if need_hessian:
        f = sharp.to(X.dtype).mean(1)[:, None, None]
        h_s = torch.tensor([[110.0, 90.0], [90.0, 110.0]], dtype=X.dtype, device=X.device)
        H = f * h_s + (1 - f) * 2.0 * torch.eye(2, dtype=X.dtype, device=X.device)
    return gbar, G - gbar[:, None, :], H


class Toy2DModel(nn.Module):
    """The 2-D toy as a module, so that generic code (``Problem``, HVPs, per-sample grads) applies.

    The only parameter is ``w`` of shape ``[2]``; ``forward(x)`` returns the per-sample losses
    ``ℓ(w; x_i)`` of shape ``[n]`` and :func:`toy2d_loss` averages them (targets are ignored).

    Args:
        init: initial ``w`` (default ``(1, 1)``, the sharp minimum where the paper starts).
        dtype: parameter dtype (default float64; the toy is tiny and curvature checks are exact).
        device: parameter device.
    """

    def __init__(
        self,
        init: tuple[float, float] | torch.Tensor = (1.0, 1.0),
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        w = torch.as_tensor(init, dtype=dtype).detach().clone().to(device)
        if w.shape != (2,):
            raise ValueError(f"init must have shape [2], got {list(w.shape)}.")
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[n]`` for data points ``[n, 2]``."""
        return toy2d_sample_loss(self.w, x)


def toy2d_loss(outputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the per-sample toy losses returned by :class:`Toy2DModel` (``targets`` ignored).

    ``targets`` exists only to fit the generic ``loss_fn(outputs, targets)`` signature; pass any
    tensor of length n (e.g. ``torch.zeros(n)``) so that batching code can index it.
    """
    del targets
    return outputs.mean()
