"""Model-zoo contract suite: every public quantity on everyday models, against dense float64.

One table (``ZOO``) of small models and losses; one parametrised test (``test_zoo``) over
(model × quantity), so a failure names both. Adding a model is one line in ``ZOO``: a name, a
builder ``build(seed) -> (model, loss_fn, inputs, targets)`` (float64, deterministic in the seed,
D ≲ 300, N ≈ 6–10) and optional flags (tolerance tier, ``reduction="none"``, quantities skipped
with a stated reason).

The references are built here, independently of sgdnoise, from ordinary autograd on the module
itself (no ``torch.func``, no flat-θ machinery of the library):

* per-sample gradients: a Python loop of ``torch.autograd.grad`` on ``loss_fn(model(x[i:i+1]), …)``;
* ∇L and the dense Hessian: the full-batch loss, then one double-backward pass per coordinate;
* Σ_b: explicit centring of the per-sample gradients, ``Cᵀ C / (N b)`` (with replacement);
* eigenpairs: ``torch.linalg.eigh``; expected sharpness: a loop over perturbed copies of the
  model with the same draws (same generator seed ⇒ same ν, drawn as ``sgdnoise._utils.randn``).

A coordinate whose autograd gradient is identically zero although the forward uses it (the
``padding_idx`` row of an ``nn.Embedding``) is a constant of the model: its Hessian row *and
column* are zero (what reverse-over-reverse autograd gives, and the only symmetric Hessian
consistent with that gradient; a forward-mode tangent along the row would see it through the
forward pass and make ``H`` non-symmetric). The reference asserts symmetry.

Quantities (``CHECKS``), each compared with the reference:

* ``per_sample_gradients`` (all samples, and repeated indices), ``gradient`` (∇L and L),
  ``chunk_size`` (G, ∇L, L, H @ V and streamed Tr Σ_b with ``chunk_size=3``), ``hvp`` (H @ V,
  V ``[D, 3]``, and H @ v);
* ``sigma_matvec`` / ``sigma_trace`` / ``sigma_diagonal``: Σ_b @ V, Tr Σ_b, diag Σ_b, each
  materialised and streaming (``materialize=False``);
* ``indicator_exact`` (tr_HS, tr_H, tr_S, tr_HS_iso) and ``indicator_sampled`` (the estimate and
  its stderr must be those of one size-m subset of the exact terms c_iᵀHc_i, whatever the
  sampler), ``hessian_trace``;
* ``alignment`` (k = 1: a = u₁ᵀΣ_bu₁ · Tr H / (λ₁ Tr Σ_b), λ₁, u₁ᵀΣ_bu₁, traces, overlap);
* ``sharpness_vmap`` / ``sharpness_loop``: expected sharpness (``vectorize`` True / False);
* ``top_eigenpairs`` (k = 2: eigenvalues, orthonormality, residuals against the dense H);
* ``covariance_<s>``: ``noise_model(s, ...).covariance.to_dense()`` for every registered
  structure s against its documented formula;
* ``gld_<s>``: one GLD step, (θ₀ − θ₁)/η = ∇L + n with n rebuilt from the same generator seed
  (eigen structures, whose eigenvectors have arbitrary signs: |u_jᵀn| = √s_j |z_j| and n in
  their span); ``gd_step``; ``sgd_step`` (the step must be the mean gradient of some size-b
  multiset of samples).

Attention kernels: the references run under ``sdpa_kernel(SDPBackend.MATH)`` (the fused CPU
kernel has no double-backward rule; the math kernel is the same function). sgdnoise is called
with PyTorch's defaults.

Tolerance tiers (normwise: max |error| ≤ rtol · max |reference|, or the scalar's own scale):

* ``f64``: exact quantities 1e-8; Lanczos eigenvalues 1e-6 (the solver's default tolerance is
  1e-6 relative to ‖A‖); quantities built from Lanczos eigenvectors (alignment ``a``, overlap,
  the ``leading``/``hessian``/``hessian_top1`` covariances and their GLD noise) 1e-4, since an
  eigenvector is only accurate to (residual / spectral gap).
* ``f32``: 1e-5 / 1e-4 / 1e-2 (float32 rounding, u ≈ 6e-8, of sums over a few hundred terms;
  the float32 Lanczos default tolerance is 1e-3, hence the looser eigenvector tier).
* ``f16`` and ``bf16``: the model and data are rounded to 16 bits, and the reference is the
  float64 model with *the same rounded* weights and data, so only the library's 16-bit
  arithmetic separates them. Measured errors are 1–4 unit roundoffs (f16 u ≈ 9.8e-4: at most
  1.7e-3 on the MLP; bf16 u ≈ 7.8e-3: at most 1.8e-2 on the MLP and 3.1e-2 on the CNN, whose
  convolutions sum 25–250 products in 16 bits); the tolerances are about 5–6 u: f16 5e-3
  (eigenvector-derived 1e-2), bf16 5e-2 (1e-1). Steps of GD/SGD/GLD also allow
  4 u · max|θ| / η, since θ₁ itself is stored in 16 bits.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sgdnoise
from sgdnoise.measures import hessian_trace
from sgdnoise.models import FashionCNN, init_fashion_cnn_

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Built = tuple[nn.Module, LossFn, torch.Tensor, torch.Tensor]

B = 2  # mini-batch size b of Σ_b (with replacement) used throughout
M_SAMPLED = 3  # examples drawn by the sampled escape indicator
NUM_DRAWS = 4  # expected-sharpness draws
SEED = 0  # generator seed handed to sgdnoise (Lanczos starts, noise, batches, draws)


# ============================================================================================
# Tolerance tiers
# ============================================================================================


@dataclass(frozen=True)
class Tier:
    """How a model is run and how closely it must match the float64 reference."""

    dtype: torch.dtype
    exact: float  # rtol of quantities computed without iteration
    lanczos: float  # rtol of eigenvalues from Lanczos
    eigvec: float  # rtol of quantities built from eigenvectors
    lr: float  # step size of the GD/SGD/GLD steps
    sigma: float  # expected-sharpness σ (large enough for L(θ+ν) − L(θ) to exceed rounding)


TIERS = {
    "f64": Tier(torch.float64, 1e-8, 1e-6, 1e-4, 0.5, 1e-2),
    "f32": Tier(torch.float32, 1e-5, 1e-4, 1e-2, 0.5, 1e-1),
    "f16": Tier(torch.float16, 5e-3, 5e-3, 1e-2, 1.0, 3e-1),
    "bf16": Tier(torch.bfloat16, 5e-2, 5e-2, 1e-1, 1.0, 3e-1),
}


# ============================================================================================
# Builders (float64, deterministic in the seed; parameters from the seeded default init)
# ============================================================================================


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[torch.Generator]:
    """Default ``nn`` initialisation from ``seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed + 7919)


@torch.no_grad()
def _randomize_norms(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Give normalisation layers non-trivial affine parameters and running statistics."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _classes(g: torch.Generator, n: int, c: int = 3) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=g)


def _mlp(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(8, 5, generator=g)
        return model.double(), F.cross_entropy, _f64(x), _classes(g, 8)


def _fashion_cnn(seed: int) -> Built:
    """The paper's FashionCNN class (its forward: conv→maxpool→ReLU ×2, fc→ReLU, fc, on
    28×28 images), with the channel and hidden widths shrunk (10→2→1 channels, 50→6 hidden) so
    that D = 275 and a dense Hessian is cheap. The real D = 11,330 needs 11,330 double-backward
    passes for a dense reference (minutes and 1 GB), beyond this suite's budget."""
    with _seeded(seed) as g:
        model = FashionCNN(generator=g, dtype=torch.float64)
        model.conv1 = nn.Conv2d(1, 2, kernel_size=5, dtype=torch.float64)
        model.conv2 = nn.Conv2d(2, 1, kernel_size=5, dtype=torch.float64)
        model.fc1 = nn.Linear(16, 6, dtype=torch.float64)
        model.fc2 = nn.Linear(6, 10, dtype=torch.float64)
        init_fashion_cnn_(model, generator=g, std=0.3)  # the paper's truncated normal, wider
        x = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 6, 10)


def _conv_head(conv: nn.Module, out_features: int, pool: int = 1) -> nn.Module:
    layers = [conv, nn.Tanh()]
    if pool > 1:
        layers.append(nn.AvgPool2d(pool) if isinstance(conv, nn.Conv2d) else nn.AvgPool1d(pool))
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(out_features))


def _materialise(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        model(x[:1])  # LazyLinear takes its shape from one forward pass
    return model


def _conv1d(seed: int) -> Built:
    with _seeded(seed) as g:
        conv = nn.Conv1d(2, 4, kernel_size=3, stride=2, padding=1, dilation=2, groups=2)
        x = torch.randn(8, 2, 11, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv2d_stride_pad(seed: int) -> Built:
    with _seeded(seed) as g:
        conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        x = torch.randn(8, 2, 7, 7, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv2d_dilation(seed: int) -> Built:
    """groups=1: the layout a per-layer (hook) rule would take on, dilation and all."""
    with _seeded(seed) as g:
        conv = nn.Conv2d(2, 3, kernel_size=3, dilation=2, stride=(1, 2), padding=1)
        x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv2d_dilation_groups(seed: int) -> Built:
    with _seeded(seed) as g:
        conv = nn.Conv2d(4, 4, kernel_size=3, dilation=2, padding=2, groups=2)
        x = torch.randn(8, 4, 6, 6, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3, pool=3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv2d_reflect_nobias(seed: int) -> Built:
    with _seeded(seed) as g:
        conv = nn.Conv2d(1, 3, kernel_size=3, padding=1, padding_mode="reflect", bias=False)
        x = torch.randn(8, 1, 5, 5, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3, pool=2).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv_transpose(seed: int) -> Built:
    with _seeded(seed) as g:
        conv = nn.ConvTranspose2d(2, 2, kernel_size=3, stride=2, padding=1)
        x = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


def _depthwise(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(
            nn.Conv2d(3, 3, kernel_size=3, groups=3),  # depthwise
            nn.Tanh(),
            nn.Conv2d(3, 4, kernel_size=1),  # pointwise
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        ).double()
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _inplace_relu_linear(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _inplace_relu_conv(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(
            nn.Conv2d(2, 3, kernel_size=3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 3)
        ).double()
        x = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


class _InplaceResidual(nn.Module):
    """``h = inp(x); h += block(tanh(h))``: the in-place add rewrites a Linear layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h += self.block(torch.tanh(h))
        return self.out(torch.tanh(h))


def _inplace_residual(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _InplaceResidual().double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _batchnorm2d_eval(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(
            nn.Conv2d(2, 3, kernel_size=3),
            nn.BatchNorm2d(3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(27, 3),
        )
        model = _randomize_norms(model, g).double().eval()
        x = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _batchnorm1d_eval(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        model = _randomize_norms(model, g).double().eval()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _layernorm(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        model = _randomize_norms(model, g).double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _groupnorm(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(
            nn.Conv2d(2, 4, kernel_size=3),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 3),
        )
        model = _randomize_norms(model, g).double()
        x = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


class _BagOfEmbeddings(nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=padding_idx)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x).mean(1)))


def _embedding(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _BagOfEmbeddings().double()
        x = torch.randint(0, 10, (8, 5), generator=g)
        return model, F.cross_entropy, x, _classes(g, 8)


def _embedding_padding_idx(seed: int) -> Built:
    """``padding_idx=0``: autograd's gradient of the padding row is 0 by convention although the
    forward uses the row (set non-zero here), so that row is a constant of the model (never
    trained): its Hessian row *and column* are 0 (see the module docstring)."""
    with _seeded(seed) as g:
        model = _BagOfEmbeddings(padding_idx=0).double()
        with torch.no_grad():
            model.emb.weight[0].copy_(0.5 * torch.randn(4, generator=g))
        x = torch.randint(0, 10, (8, 5), generator=g)
        return model, F.cross_entropy, x, _classes(g, 8)


class _SharedLayers(nn.Module):
    """One ``nn.Parameter`` assigned to two ``nn.Linear`` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.second = nn.Linear(5, 5)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def _tied_shared(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _SharedLayers().double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.mse_loss, x, y


class _TiedAutoencoder(nn.Module):
    """Decoder ``F.linear(h, enc.weight.t())``: the encoder weight used a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec_bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)


def _tied_transpose(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _TiedAutoencoder().double()
        with torch.no_grad():
            model.dec_bias.copy_(0.3 * torch.randn(6, generator=g))
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        return model, F.mse_loss, x, x.clone()


class _ReusedLayer(nn.Module):
    """The same Linear called twice in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h)


def _reused_layer(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _ReusedLayer().double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


class _EmbLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


def _lstm(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _EmbLSTM().double()
        x = torch.randint(0, 10, (6, 4), generator=g)
        return model, F.cross_entropy, x, _classes(g, 6)


class _GRUHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def _gru(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _GRUHead().double()
        x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 6)


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``need_weights=False``: the fused SDPA kernel path."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.flatten(1))


def _mha(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _SelfAttention().double()
        x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 6)


def _transformer(seed: int) -> Built:
    with _seeded(seed) as g:
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * 4, 2))
        model = _randomize_norms(model, g).double().eval()
        x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 6, 2)


class _Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _mse_multidim(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), _Reshape(2, 3))
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 2, 3, generator=g, dtype=torch.float64)
        return model.double(), F.mse_loss, x, y


def _label_smoothing_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, label_smoothing=0.1)


def _ce_label_smoothing(seed: int) -> Built:
    model, _, x, y = _mlp(seed)
    return model, _label_smoothing_ce, x, y


VOCAB, IGNORE = 6, -100


def _token_mean_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of the token cross-entropies over non-ignored tokens → ``[n]``."""
    tok = F.cross_entropy(out.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    mask = (y != IGNORE).to(out.dtype)
    return (tok * mask).sum(1) / mask.sum(1)


class _TokenTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = nn.Conv1d(4, 4, kernel_size=3, padding=1)  # context across tokens
        self.out = nn.Linear(4, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x).transpose(1, 2)
        h = torch.tanh(self.mix(h)).transpose(1, 2)
        return self.out(h)  # [n, T, VOCAB]


def _ce_ignore_index(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _TokenTagger().double()
        x = torch.randint(0, VOCAB, (8, 5), generator=g)
        y = torch.randint(0, VOCAB, (8, 5), generator=g)
        mask = torch.rand(8, 5, generator=g) < 0.35
        mask[:, 0] = False  # every sequence keeps at least one real target
        y[mask] = IGNORE
        return model, _token_mean_ce, x, y


class _BatchNotFirst(nn.Module):
    """The batch leaves dim 0 inside forward: ``[N, T, F] → [T, N, F]`` → Linear → mean over T."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x.transpose(0, 1)))
        return self.out(h.mean(0))


def _batch_not_first(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _BatchNotFirst().double()
        x = torch.randn(8, 4, 3, generator=g, dtype=torch.float64)
        return model, F.cross_entropy, x, _classes(g, 8)


def _conv2d_same_even_kernel(seed: int) -> Built:
    """``padding="same"`` with an even kernel pads asymmetrically (one more row/column after)."""
    with _seeded(seed) as g:
        conv = nn.Conv2d(2, 2, kernel_size=4, padding="same")
        x = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64)
        model = _materialise(_conv_head(conv, 3).double(), x)
        return model, F.cross_entropy, x, _classes(g, 8)


class _TupleOutput(nn.Module):
    """Returns ``(logits, hidden)``, as many library models do; the loss reads ``out[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x))
        return self.head(h), h


def _first_output_ce(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[0], y)


def _tuple_output(seed: int) -> Built:
    with _seeded(seed) as g:
        model = _TupleOutput().double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model, _first_output_ce, x, _classes(g, 8)


def _dropout_eval(seed: int) -> Built:
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        return model.double().eval(), F.cross_entropy, x, _classes(g, 8)


class _TokenLSTM(nn.Module):
    """A sequence tagger with a time-major LSTM (``batch_first=False``: the batch is dim 1
    inside), one logit vector per token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.rnn = nn.LSTM(4, 4)
        self.out = nn.Linear(4, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x).transpose(0, 1))  # [T, n, 4]
        return self.out(h.transpose(0, 1))  # [n, T, VOCAB]


def _lstm_tokens_ignore_index(seed: int) -> Built:
    _, loss_fn, x, y = _ce_ignore_index(seed)
    with _seeded(seed):
        return _TokenLSTM().double(), loss_fn, x, y


def _bce_multilabel(seed: int) -> Built:
    """Multi-label targets in {0, 1}: ``F.binary_cross_entropy_with_logits`` (mean over labels)."""
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = (torch.rand(8, 4, generator=g) < 0.5).double()
        return model, F.binary_cross_entropy_with_logits, x, y


def _huber(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(out, y, delta=0.5)


def _huber_regression(seed: int) -> Built:
    """Huber loss (δ = 0.5; residuals on both sides of δ, so H mixes both pieces)."""
    with _seeded(seed) as g:
        model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 2)).double()
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 2, generator=g, dtype=torch.float64)
        return model, _huber, x, y


def _frozen(seed: int) -> Built:
    model, loss_fn, x, y = _mlp(seed)
    model[0].bias.requires_grad_(False)
    return model, loss_fn, x, y


# ============================================================================================
# The table
# ============================================================================================


@dataclass(frozen=True)
class Entry:
    """One zoo model. ``skip``: quantity → the reason it is not defined for this model."""

    name: str
    build: Callable[[int], Built]
    tier: str = "f64"
    reduction: str = "mean"
    seed: int = 0
    skip: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False, compare=False
    )

    def __str__(self) -> str:
        return self.name


ZOO = [
    Entry("mlp", _mlp),
    Entry("fashion_cnn", _fashion_cnn),
    Entry("conv1d_stride_pad_dil_groups", _conv1d),
    Entry("conv2d_stride_pad", _conv2d_stride_pad),
    Entry("conv2d_dilation_stride", _conv2d_dilation),
    Entry("conv2d_dilation_groups", _conv2d_dilation_groups),
    Entry("conv2d_reflect_nobias", _conv2d_reflect_nobias),
    Entry("conv_transpose2d", _conv_transpose),
    Entry("depthwise_conv", _depthwise),
    Entry("inplace_relu_linear", _inplace_relu_linear),
    Entry("inplace_relu_conv", _inplace_relu_conv),
    Entry("inplace_residual_add", _inplace_residual),
    Entry("batchnorm2d_eval", _batchnorm2d_eval),
    Entry("batchnorm1d_eval", _batchnorm1d_eval),
    Entry("layernorm", _layernorm),
    Entry("groupnorm", _groupnorm),
    Entry("embedding", _embedding),
    Entry("embedding_padding_idx", _embedding_padding_idx),
    Entry("tied_shared_parameter", _tied_shared),
    Entry("tied_transposed_decoder", _tied_transpose),
    Entry("layer_called_twice", _reused_layer),
    Entry("lstm", _lstm),
    Entry("gru", _gru),
    Entry("multihead_attention", _mha),
    Entry("transformer_encoder_eval", _transformer),
    Entry("mse_multidim_targets", _mse_multidim),
    Entry("ce_label_smoothing", _ce_label_smoothing),
    Entry("ce_ignore_index_tokens", _ce_ignore_index, reduction="none"),
    Entry("lstm_time_major_ignore_index", _lstm_tokens_ignore_index, reduction="none"),
    Entry("bce_with_logits_multilabel", _bce_multilabel),
    Entry("huber_regression", _huber_regression),
    Entry("frozen_parameter", _frozen),
    Entry("batch_not_first_inside", _batch_not_first),
    Entry("conv2d_same_even_kernel", _conv2d_same_even_kernel),
    Entry("tuple_output", _tuple_output),
    Entry("dropout_eval", _dropout_eval),
    Entry("fashion_cnn_float32", _fashion_cnn, tier="f32"),
    Entry("mlp_float32", _mlp, tier="f32"),
    Entry("mlp_float16", _mlp, tier="f16"),
    Entry("mlp_bfloat16", _mlp, tier="bf16"),
    Entry("fashion_cnn_bfloat16", _fashion_cnn, tier="bf16"),
    Entry("fashion_cnn_float16", _fashion_cnn, tier="f16"),
    Entry("lstm_float32", _lstm, tier="f32"),
]

#: Lanczos product budget. D ≤ 300 here and the solver reorthogonalises fully, so a healthy
#: run converges in a few dozen products; the budget only bounds how long a broken operator
#: (e.g. a non-symmetric "Hessian") takes to fail (the default, 2000, costs ~15 s per call).
MAX_MATVECS = 400

#: options of each noise structure in the covariance and GLD checks.
NOISE_OPTIONS: dict[str, dict[str, object]] = {
    "const": {"sigma": 0.05},
    "leading": {"k": 2},
    "hessian": {"k": 2, "max_matvecs": MAX_MATVECS, "on_nonconvergence": "raise"},
    "hessian_top1": {"max_matvecs": MAX_MATVECS, "on_nonconvergence": "raise"},
}


# ============================================================================================
# The dense float64 reference
# ============================================================================================


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors: list[torch.Tensor | None], like: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t).reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def _mean_loss(entry: Entry, loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    value = loss_fn(out, y)
    return value.mean() if entry.reduction == "none" else value


@dataclass
class Reference:
    x: torch.Tensor
    y: torch.Tensor
    theta: torch.Tensor  # [D]
    loss: float
    G: torch.Tensor  # [N, D] per-sample gradients
    grad: torch.Tensor  # [D] gradient of the full-batch loss
    H: torch.Tensor  # [D, D]
    C: torch.Tensor  # [N, D] centred per-sample gradients
    S: torch.Tensor  # [D, D] Σ_b
    lam: torch.Tensor  # eigenvalues of H, descending
    U: torch.Tensor  # eigenvectors of H (columns)
    mu: torch.Tensor  # eigenvalues of Σ_b, descending
    W: torch.Tensor  # eigenvectors of Σ_b
    V: torch.Tensor  # [D, 3] test vectors
    model: nn.Module  # the float64 reference model (at theta)
    loss_fn: LossFn

    @property
    def N(self) -> int:
        return self.G.shape[0]

    @property
    def D(self) -> int:
        return self.G.shape[1]


def _build(entry: Entry) -> Built:
    """The model and data in the entry's dtype (16-bit tiers: rounded from the float64 build)."""
    model, loss_fn, x, y = entry.build(entry.seed)
    dtype = TIERS[entry.tier].dtype
    if dtype != torch.float64:
        model = model.to(dtype)
        x = x.to(dtype) if x.is_floating_point() else x
        y = y.to(dtype) if y.is_floating_point() else y
    return model, loss_fn, x, y


@functools.lru_cache(maxsize=4)  # tests run model by model; a few references suffice
def reference(entry: Entry) -> Reference:
    model, loss_fn, x, y = _build(entry)
    # The float64 model with the same (possibly 16-bit-rounded) weights and data.
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    params = _trainable(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    N, D = x.shape[0], theta.numel()
    with sdpa_kernel(SDPBackend.MATH):
        rows, losses = [], []
        for i in range(N):
            value = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
            rows.append(_flat(list(torch.autograd.grad(value, params, allow_unused=True)), params))
            losses.append(float(value.detach()))
        G = torch.stack(rows)
        full = _mean_loss(entry, loss_fn, model(x), y)
        grads = torch.autograd.grad(full, params, create_graph=True, allow_unused=True)
        g = _flat(list(grads), params)
        H = torch.zeros(D, D, dtype=torch.float64)
        for j in range(D):
            if g[j].requires_grad:
                row = torch.autograd.grad(g[j], params, retain_graph=True, allow_unused=True)
                H[j] = _flat(list(row), params)
    # A coordinate whose autograd gradient is identically 0 (an Embedding's padding row) is a
    # constant of the model: zero its Hessian column as well as its row.
    const = (H == 0).all(1) & (G == 0).all(0)
    H[:, const] = 0
    asym = float((H - H.T).abs().max())
    assert asym <= 1e-10 * float(H.abs().max()), f"test model: Hessian not symmetric ({asym:.3g})"
    H = (H + H.T) / 2
    C = G - G.mean(0)
    S = C.T @ C / (N * B)
    lam, U = torch.linalg.eigh(H)
    mu, W = torch.linalg.eigh(S)
    gen = torch.Generator().manual_seed(1234)
    V = torch.randn(D, 3, generator=gen, dtype=torch.float64)
    return Reference(
        x=x,
        y=y,
        theta=theta,
        loss=float(full.detach()),
        G=G,
        grad=g.detach(),
        H=H,
        C=C,
        S=S,
        lam=lam.flip(0),
        U=U.flip(1),
        mu=mu.flip(0),
        W=W.flip(1),
        V=V,
        model=model,
        loss_fn=loss_fn,
    )


# ============================================================================================
# Comparison helpers
# ============================================================================================


def _close(actual: object, expected: torch.Tensor, rtol: float, what: str) -> None:
    """max |actual − expected| ≤ rtol · max |expected| (normwise, float64)."""
    a = torch.as_tensor(actual).detach().to(torch.float64)
    e = torch.as_tensor(expected).detach().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {list(a.shape)}, reference {list(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{what}: non-finite entries"
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= rtol * scale + 1e-300, (
        f"{what}: max |error| {err:.3g} > rtol {rtol:g} × max|ref| {scale:.3g} "
        f"(relative {err / max(scale, 1e-300):.3g})"
    )


def _close_scalar(actual: float, expected: float, rtol: float, scale: float, what: str) -> None:
    """|actual − expected| ≤ rtol · scale, with scale ≥ |expected| (the size of its terms)."""
    scale = max(abs(float(expected)), float(scale))
    err = abs(float(actual) - float(expected))
    assert math.isfinite(float(actual)), f"{what}: {actual} is not finite"
    assert err <= rtol * scale, (
        f"{what}: {float(actual):.10g} vs reference {float(expected):.10g} "
        f"(error {err:.3g} > rtol {rtol:g} × scale {scale:.3g})"
    )


def _gap_ok(values: torch.Tensor, j: int, what: str) -> None:
    """The test model itself must have a spectral gap after index j (else pick another seed)."""
    top = float(values.abs().max())
    gap = float(values[j] - values[j + 1])
    assert gap > 1e-3 * top, (
        f"test model: {what} eigenvalues {j} and {j + 1} are (nearly) degenerate "
        f"({float(values[j]):.4g}, {float(values[j + 1]):.4g}); change the entry's seed"
    )


def _draws(shape: tuple[int, ...], dtype: torch.dtype, seed: int = SEED) -> torch.Tensor:
    """The standard normal draws sgdnoise makes from ``generator=seed`` (as ``_utils.randn``)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ============================================================================================
# The checks, one per quantity
# ============================================================================================


@dataclass
class Ctx:
    entry: Entry
    tier: Tier
    ref: Reference
    problem: sgdnoise.Problem
    model: nn.Module

    def vec(self, V: torch.Tensor) -> torch.Tensor:
        return V.to(self.tier.dtype)


def _make_problem(
    entry: Entry, chunk_size: int | None = None
) -> tuple[sgdnoise.Problem, nn.Module]:
    model, loss_fn, x, y = _build(entry)
    kwargs: dict[str, object] = {"chunk_size": chunk_size}
    if entry.reduction != "mean":
        kwargs["reduction"] = entry.reduction
    return sgdnoise.Problem(model, loss_fn, x, y, **kwargs), model


def check_per_sample_gradients(c: Ctx) -> None:
    _close(sgdnoise.per_sample_gradients(c.problem), c.ref.G, c.tier.exact, "G")
    idx = [c.ref.N - 1, 0, 0]
    _close(sgdnoise.per_sample_gradients(c.problem, idx), c.ref.G[idx], c.tier.exact, "G[idx]")


def check_gradient(c: Ctx) -> None:
    _close(c.problem.gradient(), c.ref.grad, c.tier.exact, "∇L")
    _close(c.problem.gradient(), c.ref.G.mean(0), c.tier.exact, "∇L vs mean of g_i")
    _close_scalar(float(c.problem.loss()), c.ref.loss, c.tier.exact, 0.0, "L")


def check_chunk_size(c: Ctx) -> None:
    p, _ = _make_problem(c.entry, chunk_size=3)
    _close(sgdnoise.per_sample_gradients(p), c.ref.G, c.tier.exact, "G (chunk_size=3)")
    _close(p.gradient(), c.ref.grad, c.tier.exact, "∇L (chunk_size=3)")
    _close_scalar(float(p.loss()), c.ref.loss, c.tier.exact, 0.0, "L (chunk_size=3)")
    HV = sgdnoise.hessian(p) @ c.vec(c.ref.V)
    _close(HV, c.ref.H @ c.vec(c.ref.V).double(), c.tier.exact, "H @ V (chunk_size=3)")
    tr = sgdnoise.gradient_noise_covariance(p, B, materialize=False).trace()
    _close(tr, c.ref.S.trace(), c.tier.exact, "Tr Σ_b streaming (chunk_size=3)")


def check_hvp(c: Ctx) -> None:
    V = c.vec(c.ref.V)
    H = sgdnoise.hessian(c.problem)
    _close(H @ V, c.ref.H @ V.double(), c.tier.exact, "H @ V")
    _close(H @ V[:, 0], c.ref.H @ V[:, 0].double(), c.tier.exact, "H @ v")


def _sigma(c: Ctx, materialize: bool) -> sgdnoise.GradientNoiseCovariance:
    return sgdnoise.gradient_noise_covariance(c.problem, B, materialize=materialize)


def _check_sigma_matvec(c: Ctx, materialize: bool) -> None:
    V = c.vec(c.ref.V)
    _close(_sigma(c, materialize) @ V, c.ref.S @ V.double(), c.tier.exact, "Σ_b @ V")


def _check_sigma_trace(c: Ctx, materialize: bool) -> None:
    _close(_sigma(c, materialize).trace(), c.ref.S.trace(), c.tier.exact, "Tr Σ_b")
    # Without replacement: Σ_b = Σ_1 (N − b) / (b (N − 1)).
    N = c.ref.N
    without = sgdnoise.gradient_noise_covariance(
        c.problem, B, replacement=False, materialize=materialize
    )
    expected = c.ref.S.trace() * B * (N - B) / (B * (N - 1))
    _close(without.trace(), expected, c.tier.exact, "Tr Σ_b without replacement")


def _check_sigma_diagonal(c: Ctx, materialize: bool) -> None:
    _close(_sigma(c, materialize).diagonal(), c.ref.S.diagonal(), c.tier.exact, "diag Σ_b")


def _quad_forms(ref: Reference) -> torch.Tensor:
    """``c_iᵀ H c_i`` for every sample i."""
    return ((ref.C @ ref.H) * ref.C).sum(1)


def check_indicator_exact(c: Ctx) -> None:
    r, t = c.ref, c.tier.exact
    ind = sgdnoise.escape_indicator(c.problem, B)
    q = _quad_forms(r)
    tr_HS, tr_H, tr_S = float(q.mean()) / B, float(r.H.trace()), float(r.S.trace())
    assert ind.exact and ind.num_samples == r.N and ind.dim == r.D and ind.batch_size == B
    _close_scalar(ind.tr_HS, tr_HS, t, float(q.abs().mean()) / B, "tr_HS")
    _close_scalar(ind.tr_H, tr_H, t, float(r.H.diagonal().abs().sum()), "tr_H")
    _close_scalar(ind.tr_S, tr_S, t, 0.0, "tr_S")
    iso_scale = float(r.H.diagonal().abs().sum()) * tr_S / r.D
    _close_scalar(ind.tr_HS_iso, tr_H * tr_S / r.D, t, iso_scale, "tr_HS_iso")


def check_indicator_sampled(c: Ctx) -> None:
    """The estimate must be (s/m) Σ_{i∈S} c_iᵀHc_i for one size-m subset S, with its stderr."""
    r, t, m = c.ref, c.tier.exact, M_SAMPLED
    ind = sgdnoise.escape_indicator(c.problem, B, num_samples=m, generator=SEED)
    assert not ind.exact and ind.num_samples == m
    q = _quad_forms(r).double()
    scale = float(q.abs().max()) / B
    fpc = math.sqrt(1 - m / r.N)
    best, best_err = None, math.inf
    for S in itertools.combinations(range(r.N), m):
        qs = q[list(S)]
        est, se = float(qs.mean()) / B, float(qs.std()) / math.sqrt(m) / B * fpc
        err = abs(est - ind.tr_HS) + abs(se - ind.stderr)
        if err < best_err:
            best, best_err = (S, est, se), err
    assert best is not None
    S, est, se = best
    _close_scalar(ind.tr_HS, est, t, scale, f"sampled tr_HS (closest subset {S})")
    _close_scalar(ind.stderr, se, t, scale, f"sampled stderr (subset {S})")
    _close_scalar(ind.tr_S, float(r.S.trace()), t, 0.0, "tr_S")


def check_hessian_trace(c: Ctx) -> None:
    tr, se, exact = hessian_trace(sgdnoise.hessian(c.problem))
    assert exact and se == 0.0
    r = c.ref
    _close_scalar(tr, float(r.H.trace()), c.tier.exact, float(r.H.diagonal().abs().sum()), "Tr H")


def check_alignment(c: Ctx) -> None:
    r, tier = c.ref, c.tier
    _gap_ok(r.lam, 0, "Hessian")
    _gap_ok(r.mu, 0, "Σ_b")
    al = sgdnoise.alignment(c.problem, B, k=1, generator=SEED)
    u1, v1, lam1, mu1 = r.U[:, 0], r.W[:, 0], float(r.lam[0]), float(r.mu[0])
    tr_H, tr_S = float(r.H.trace()), float(r.S.trace())
    uSu = float(u1 @ r.S @ u1)
    a = uSu * tr_H / (lam1 * tr_S)
    norm_H = float(r.lam.abs().max())
    assert al.k == 1
    _close_scalar(al.lambda_1, lam1, tier.lanczos, norm_H, "lambda_1")
    _close_scalar(al.hessian_eigenvalues[0], lam1, tier.lanczos, norm_H, "hessian_eigenvalues[0]")
    _close_scalar(al.noise_eigenvalues[0], mu1, tier.lanczos, mu1, "noise_eigenvalues[0]")
    _close_scalar(al.tr_H, tr_H, tier.exact, float(r.H.diagonal().abs().sum()), "tr_H")
    _close_scalar(al.tr_S, tr_S, tier.exact, 0.0, "tr_S")
    _close_scalar(al.u1_S_u1, uSu, tier.eigvec, mu1, "u1ᵀ Σ_b u1")
    a_scale = mu1 * abs(tr_H) / (abs(lam1) * tr_S)
    _close_scalar(al.a, a, tier.eigvec, a_scale, "a")
    _close_scalar(al.overlap, float(u1 @ v1) ** 2, tier.eigvec, 1.0, "overlap (k=1)")


def _check_sharpness(c: Ctx, vectorize: bool) -> None:
    r, tier = c.ref, c.tier
    sigma = tier.sigma
    es = sgdnoise.expected_sharpness(
        c.problem, sigma, NUM_DRAWS, generator=SEED, vectorize=vectorize
    )
    # Same draws as sgdnoise (one batch of NUM_DRAWS ≤ draws_per_batch), θ + σν rounded in the
    # problem's dtype (float32 for 16-bit models, which sgdnoise evaluates on a float32 copy),
    # then the loss of the float64 reference model at that point.
    work = torch.float32 if tier.dtype in (torch.float16, torch.bfloat16) else tier.dtype
    theta0 = c.problem.theta().to(work)
    nu = _draws((NUM_DRAWS, r.D), work)
    model = copy.deepcopy(r.model)
    params = _trainable(model)

    def loss_at(theta: torch.Tensor) -> float:
        with torch.no_grad():
            pieces = torch.split(theta.double(), [p.numel() for p in params])
            for p, piece in zip(params, pieces, strict=True):
                p.copy_(piece.reshape(p.shape))
            with sdpa_kernel(SDPBackend.MATH):
                return float(_mean_loss(c.entry, r.loss_fn, model(r.x), r.y))

    L0 = loss_at(theta0)
    d = torch.tensor([loss_at(theta0 + sigma * n) - L0 for n in nu], dtype=torch.float64)
    scale = float(d.abs().mean())
    t = tier.exact
    _close_scalar(es.loss, L0, t, 0.0, "L(θ)")
    _close_scalar(es.signed, float(d.mean()), t, scale, "signed sharpness")
    _close_scalar(es.absolute, float(d.abs().mean()), t, scale, "absolute sharpness")
    se = float(d.std()) / math.sqrt(NUM_DRAWS)
    _close_scalar(es.signed_stderr, se, t, scale, "signed stderr")
    assert es.num_samples == NUM_DRAWS
    # The model is left bit-for-bit unchanged.
    assert torch.equal(c.problem.theta(), theta0)


def check_top_eigenpairs(c: Ctx) -> None:
    r, tier = c.ref, c.tier
    _gap_ok(r.lam, 1, "Hessian")
    H = sgdnoise.hessian(c.problem)
    pairs = sgdnoise.top_eigenpairs(H, k=2, generator=SEED, max_matvecs=MAX_MATVECS)
    norm_H = float(r.lam.abs().max())
    _close(pairs.eigenvalues, r.lam[:2], tier.lanczos, "top-2 eigenvalues of H")
    U = pairs.eigenvectors.double()
    _close(U.T @ U, torch.eye(2, dtype=torch.float64), tier.lanczos, "UᵀU")
    resid = (r.H @ U - U * pairs.eigenvalues.double()).norm(dim=0)
    assert float(resid.max()) <= 10 * tier.lanczos * norm_H, (
        f"Ritz residuals ‖H u − λ u‖ = {resid.tolist()} against the dense H (‖H‖ = {norm_H:.3g})"
    )


# ---------------------------------------------------------------- noise structures


def _low_rank(U: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (U * s) @ U.T


def _hessian_scales(r: Reference, k: int) -> torch.Tensor:
    """``s_j = Tr Σ_b · λ_j⁺ / Σ λ⁺`` (``hessian``); ``[Tr Σ_b]`` for k = 1 (``hessian_top1``)."""
    tr_S = r.S.trace()
    if k == 1:
        return tr_S.reshape(1)
    lam = r.lam[:k].clamp_min(0)
    return lam * tr_S / lam.sum()


def _eigen_spec(name: str, r: Reference) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(vectors [D, k], covariance eigenvalues [k], Lanczos-based) of an eigen structure."""
    if name == "leading":
        _gap_ok(r.mu, 0, "Σ_b")
        _gap_ok(r.mu, 1, "Σ_b")
        return r.W[:, :2], r.mu[:2], False
    k = 2 if name == "hessian" else 1
    _gap_ok(r.lam, 0, "Hessian")
    if k == 2:
        _gap_ok(r.lam, 1, "Hessian")
    return r.U[:, :k], _hessian_scales(r, k), True


EIGEN_STRUCTURES = ("leading", "hessian", "hessian_top1")


def _dense_covariance(name: str, r: Reference) -> torch.Tensor:
    eye = torch.eye(r.D, dtype=torch.float64)
    if name == "const":
        return float(NOISE_OPTIONS["const"]["sigma"]) ** 2 * eye  # type: ignore[arg-type]
    if name == "dynamic":
        return r.S.trace() / r.D * eye
    if name == "diag":
        return torch.diag(r.S.diagonal())
    if name in ("full", "multiplicative"):
        return r.S
    if name in EIGEN_STRUCTURES:
        U, s, _ = _eigen_spec(name, r)
        return _low_rank(U, s)
    raise KeyError(name)


def _check_covariance(c: Ctx, name: str) -> None:
    expected = _dense_covariance(name, c.ref)
    nm = sgdnoise.noise_model(name, c.problem, batch_size=B, **NOISE_OPTIONS.get(name, {}))
    rtol = c.tier.eigvec if name in EIGEN_STRUCTURES else c.tier.exact
    _close(nm.covariance.to_dense(), expected, rtol, f"{name}: Cov(n)")


def _step_direction(c: Ctx, opt: torch.optim.Optimizer, lr: float) -> torch.Tensor:
    """``(θ₀ − θ₁) / η`` in float64 after one step: ∇L (+ n)."""
    theta0 = c.problem.theta().double()
    opt.step()
    return (theta0 - c.problem.theta().double()) / lr


def _step_rtol(c: Ctx, base: float) -> float:
    """16-bit tiers: θ₁ itself is rounded, which the division by η amplifies."""
    if c.tier.dtype in (torch.float16, torch.bfloat16):
        ulp = float(torch.finfo(c.tier.dtype).eps)
        return base + 4 * ulp * float(c.ref.theta.abs().max()) / c.tier.lr
    return base


def _reference_noise(c: Ctx, name: str) -> torch.Tensor | None:
    """The noise GLD draws at step 0 from ``generator=SEED`` (None for eigen structures)."""
    r, dtype, N, D = c.ref, c.tier.dtype, c.ref.N, c.ref.D
    if name == "const":
        return float(NOISE_OPTIONS["const"]["sigma"]) * _draws((D,), dtype).double()  # type: ignore[arg-type]
    if name == "dynamic":
        return (r.S.trace() / D).sqrt() * _draws((1, D), dtype)[0].double()
    if name == "diag":
        return r.S.diagonal().sqrt() * _draws((1, D), dtype)[0].double()
    if name == "full":  # n = L z, L = √(s/N) Cᵀ, z ~ N(0, I_N)
        return math.sqrt(1 / (B * N)) * (_draws((1, N), dtype)[0].double() @ r.C)
    if name == "multiplicative":  # weights w = 1 + √(sN)(z − z̄); n = (1/N) Σ (w_i − 1) g_i
        z = _draws((1, N), dtype)[0].double()
        w = 1 + math.sqrt(N / B) * (z - z.mean())
        return (w - 1) @ r.G / N
    return None


def _check_gld_step(c: Ctx, name: str) -> None:
    r, lr = c.ref, c.tier.lr
    opt = sgdnoise.make_optimizer(
        f"gld_{name}", c.problem, lr, generator=SEED, batch_size=B, **NOISE_OPTIONS.get(name, {})
    )
    d = _step_direction(c, opt, lr)
    n = _reference_noise(c, name)
    if n is not None:
        _close(d, r.grad + n, _step_rtol(c, c.tier.exact), f"gld_{name}: (θ₀ − θ₁)/η = ∇L + n")
        return
    # Eigen structures: n = Σ_j √s_j z_j u_j with eigenvectors known up to sign, so check
    # |u_jᵀ n| = √s_j |z_j| and that n lies in their span.
    U, s, _ = _eigen_spec(name, r)
    z = _draws((1, U.shape[1]), c.tier.dtype)[0].double()
    e = d - r.grad
    scale = float(max(r.grad.abs().max(), (s.sqrt() * z.abs()).max()))
    rtol = _step_rtol(c, c.tier.eigvec)
    _close((U.T @ e).abs(), s.sqrt() * z.abs(), rtol * scale / float((s.sqrt() * z.abs()).max()),
           f"gld_{name}: |u_jᵀ n|")  # fmt: skip
    outside = e - U @ (U.T @ e)
    assert float(outside.abs().max()) <= rtol * scale, (
        f"gld_{name}: (θ₀ − θ₁)/η − ∇L has a component {float(outside.abs().max()):.3g} outside "
        f"the top-{U.shape[1]} eigenvectors (scale {scale:.3g})"
    )


def check_gd_step(c: Ctx) -> None:
    d = _step_direction(c, sgdnoise.make_optimizer("gd", c.problem, c.tier.lr), c.tier.lr)
    _close(d, c.ref.grad, _step_rtol(c, c.tier.exact), "gd: (θ₀ − θ₁)/η = ∇L")


def check_sgd_step(c: Ctx) -> None:
    """The step must be the mean gradient of some size-b multiset of samples."""
    r = c.ref
    opt = sgdnoise.make_optimizer("sgd", c.problem, c.tier.lr, generator=SEED, batch_size=B)
    d = _step_direction(c, opt, c.tier.lr)
    batches = list(itertools.combinations_with_replacement(range(r.N), B))
    means = torch.stack([r.G[list(bt)].mean(0) for bt in batches])
    errs = (means - d).abs().amax(1)
    j = int(errs.argmin())
    _close(d, means[j], _step_rtol(c, c.tier.exact), f"sgd: step vs batch {batches[j]}")


CHECKS: dict[str, Callable[[Ctx], None]] = {
    "per_sample_gradients": check_per_sample_gradients,
    "gradient": check_gradient,
    "chunk_size": check_chunk_size,
    "hvp": check_hvp,
    "sigma_matvec": functools.partial(_check_sigma_matvec, materialize=True),
    "sigma_matvec_streaming": functools.partial(_check_sigma_matvec, materialize=False),
    "sigma_trace": functools.partial(_check_sigma_trace, materialize=True),
    "sigma_trace_streaming": functools.partial(_check_sigma_trace, materialize=False),
    "sigma_diagonal": functools.partial(_check_sigma_diagonal, materialize=True),
    "sigma_diagonal_streaming": functools.partial(_check_sigma_diagonal, materialize=False),
    "indicator_exact": check_indicator_exact,
    "indicator_sampled": check_indicator_sampled,
    "hessian_trace": check_hessian_trace,
    "alignment": check_alignment,
    "sharpness_vmap": functools.partial(_check_sharpness, vectorize=True),
    "sharpness_loop": functools.partial(_check_sharpness, vectorize=False),
    "top_eigenpairs": check_top_eigenpairs,
    **{
        f"covariance_{s}": functools.partial(_check_covariance, name=s)
        for s in sgdnoise.noise_structures()
    },
    **{f"gld_{s}": functools.partial(_check_gld_step, name=s) for s in sgdnoise.noise_structures()},
    "gd_step": check_gd_step,
    "sgd_step": check_sgd_step,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is several times faster than contended OpenMP teams."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zoo_table_is_complete() -> None:
    names = [e.name for e in ZOO]
    assert len(names) == len(set(names)) and len(names) >= 22
    for e in ZOO:
        assert e.tier in TIERS and e.reduction in ("mean", "none"), e
        assert set(e.skip) <= set(CHECKS), f"{e.name}: unknown quantities in skip: {set(e.skip)}"
        assert all(isinstance(v, str) and v for v in e.skip.values()), f"{e.name}: give a reason"


@pytest.mark.parametrize("quantity", list(CHECKS))
@pytest.mark.parametrize("entry", ZOO, ids=str)
def test_zoo(entry: Entry, quantity: str) -> None:
    if quantity in entry.skip:
        pytest.skip(f"{entry.name}: {quantity} skipped: {entry.skip[quantity]}")
    ref = reference(entry)
    problem, model = _make_problem(entry)
    assert problem.dim == ref.D and problem.num_samples == ref.N
    CHECKS[quantity](Ctx(entry, TIERS[entry.tier], ref, problem, model))


def test_fashion_cnn_real_size_first_order_quantities() -> None:
    """The paper's FashionCNN at its real size (D = 11,330; N = 6), outside the table because a
    dense D×D reference (1 GB, 11,330 double-backward passes) is not affordable here: the
    quantities that need no dense matrix — per-sample gradients (the layer-hook fast path on this
    network), ∇L, H @ V, Σ_b @ V, Tr Σ_b, diag Σ_b and one GLD('diag') step — against the loop."""
    with _seeded(11) as g:
        model = FashionCNN(generator=g, dtype=torch.float64)
        x = torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64)
        y = _classes(g, 6, 10)
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    params = _trainable(model)
    assert problem.dim == 11_330
    G = torch.stack(
        [
            _flat(
                list(
                    torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
                ),
                params,
            )
            for i in range(6)
        ]
    )
    loss = F.cross_entropy(model(x), y)
    grad = _flat(list(torch.autograd.grad(loss, params, create_graph=True)), params)
    V = torch.randn(problem.dim, 3, generator=g, dtype=torch.float64)
    HV = torch.stack(
        [
            _flat(list(torch.autograd.grad(grad @ V[:, j], params, retain_graph=True)), params)
            for j in range(3)
        ],
        1,
    )
    C = G - G.mean(0)
    rtol = TIERS["f64"].exact
    _close(sgdnoise.per_sample_gradients(problem), G, rtol, "G")
    _close(problem.gradient(), grad.detach(), rtol, "∇L")
    _close(sgdnoise.hessian(problem) @ V, HV, rtol, "H @ V")
    S = sgdnoise.gradient_noise_covariance(problem, B)
    _close(S @ V, C.T @ (C @ V) / (6 * B), rtol, "Σ_b @ V")
    _close(S.trace(), (C**2).sum() / (6 * B), rtol, "Tr Σ_b")
    _close(S.diagonal(), (C**2).sum(0) / (6 * B), rtol, "diag Σ_b")
    lr = 0.5
    opt = sgdnoise.make_optimizer("gld_diag", problem, lr, generator=SEED, batch_size=B)
    theta0 = problem.theta()
    opt.step()
    d = (theta0 - problem.theta()) / lr
    n = ((C**2).sum(0) / (6 * B)).sqrt() * _draws((1, problem.dim), torch.float64)[0]
    _close(d, grad.detach() + n, rtol, "gld_diag: (θ₀ − θ₁)/η = ∇L + n")


# ============================================================================================
# Losses that are not a sample mean: refused, never a silently scaled number
# ============================================================================================


def _weighted_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class weights: the batch loss is Σ w_yᵢ ℓᵢ / Σ w_yᵢ, a weighted (not a sample) mean."""
    return F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 5.0], dtype=out.dtype))


def _sum_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _sum_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum")


def _pooled_token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A token mean over the whole batch: sequences weighted by their number of real tokens."""
    return F.cross_entropy(out.transpose(1, 2), y, ignore_index=IGNORE)


#: name → (builder of model and data, loss_fn, refused already at construction). Sums are seen
#: by any probe; a class-weighted or pooled token mean only on samples whose weights differ, so
#: for those the refusal may come at the first per-sample pass instead (never a number).
REFUSED: dict[str, tuple[Callable[[int], Built], LossFn, bool]] = {
    "ce_reduction_sum": (_mlp, _sum_ce, True),
    "CrossEntropyLoss_sum": (_mlp, nn.CrossEntropyLoss(reduction="sum"), True),
    "mse_reduction_sum": (_mse_multidim, _sum_mse, True),
    "ce_class_weights": (_mlp, _weighted_ce, False),
    "token_mean_ignore_index_without_reduction_none": (_ce_ignore_index, _pooled_token_ce, False),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_loss_that_is_not_a_sample_mean_is_refused(name: str) -> None:
    """The README's loss convention is checked: a ValueError that says the loss must be a mean
    over samples (or points to ``reduction="none"``), at construction for sums, and at the
    latest before the escape indicator returns a number for the others."""
    build, loss_fn, at_construction = REFUSED[name]
    model, _, x, y = build(0)
    with pytest.raises(ValueError, match=r"(?i)mean|reduction"):
        problem = sgdnoise.Problem(model, loss_fn, x, y)
        if not at_construction:
            sgdnoise.escape_indicator(problem, B)
