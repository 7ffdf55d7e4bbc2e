"""The gradient noise scale ``B_simple = Tr(Σ₁) / ‖∇L‖²`` (McCandlish, Kaplan, Amodei et al., 2018,
"An Empirical Model of Large-Batch Training", eq. 2.8 and appendix A.1).

Conventions (those of :mod:`sgdnoise.linalg.covariance`): per-sample gradients ``g_i``, their
mean ``ḡ = ∇L``, per-sample covariance ``Σ₁ = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ`` (divisor N: the
covariance of one example drawn uniformly from the N). ``B_simple`` is the batch size at which the
mini-batch gradient's noise ``Tr Σ_b = Tr Σ₁ / b`` equals the squared signal ``‖∇L‖²``.

Two ways to compute it:

* ``method="exact"``: ``Tr Σ₁`` from the per-sample gradients (one pass, streamed in chunks) and
  ``‖ḡ‖²`` from their mean — exact at the current θ.
* ``method="two_batch"`` (McCandlish et al., appendix A.1): no per-sample gradients, only
  mini-batch gradients of two sizes ``b_small < b_big`` drawn with replacement. Since
  ``E‖g_B‖² = ‖ḡ‖² + Tr Σ₁ / B`` exactly for a batch of B i.i.d. uniform indices,

  ``‖ḡ‖²_est = (b_big ‖g_big‖² − b_small ‖g_small‖²) / (b_big − b_small)`` and
  ``S_est = (‖g_small‖² − ‖g_big‖²) / (1/b_small − 1/b_big)``

  are unbiased for ``‖ḡ‖²`` and ``Tr Σ₁``; averaged over ``num_pairs`` independent pairs, their
  ratio estimates ``B_simple`` (a ratio of unbiased means, consistent, with a delta-method standard
  error).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ._utils import resolve_generator
from .problem import Problem
from .results import format_table

__all__ = ["GradientNoiseScale", "gradient_noise_scale"]


@dataclass(frozen=True)
class GradientNoiseScale:
    """The gradient noise scale and its ingredients.

    Attributes:
        b_simple: ``Tr Σ₁ / ‖∇L‖²`` (a number of examples).
        tr_sigma: ``Tr Σ₁`` (per-sample covariance, divisor N; squared gradient units).
        grad_norm_sq: ``‖∇L‖²``.
        method: ``"exact"`` or ``"two_batch"``.
        stderr: standard error of ``b_simple`` (0.0 when exact).
        tr_sigma_stderr, grad_norm_sq_stderr: standard errors of the two ingredients.
        num_pairs: batch pairs drawn (two-batch method; 0 when exact).
        b_small, b_big: the two batch sizes (two-batch method; ``None`` when exact).
    """

    b_simple: float
    tr_sigma: float
    grad_norm_sq: float
    method: str
    stderr: float
    tr_sigma_stderr: float
    grad_norm_sq_stderr: float
    num_pairs: int
    b_small: int | None
    b_big: int | None

    def __str__(self) -> str:
        se = None if self.method == "exact" else self.stderr
        rows = [
            ("B_simple", self.b_simple, se),
            ("Tr Σ₁", self.tr_sigma, None if se is None else self.tr_sigma_stderr),
            ("‖∇L‖²", self.grad_norm_sq, None if se is None else self.grad_norm_sq_stderr),
        ]
        how = (
            self.method
            if self.method == "exact"
            else (f"two_batch, b={self.b_small}/{self.b_big}, {self.num_pairs} pairs")
        )
        return format_table("GradientNoiseScale", rows, how)

    def to_dict(self) -> dict[str, object]:
        """The fields as a dict (JSON-ready)."""
        return asdict(self)


def _check_size(name: str, value: object, N: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= N:
        raise ValueError(f"{name} must be an integer in [1, N] = [1, {N}], got {value!r}")
    return value


def gradient_noise_scale(
    problem: Problem,
    *,
    method: str = "exact",
    b_small: int | None = None,
    b_big: int | None = None,
    num_pairs: int = 32,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
) -> GradientNoiseScale:
    """The gradient noise scale ``B_simple = Tr Σ₁ / ‖∇L‖²`` at the model's current parameters.

    Args:
        problem: model, loss and data (``N`` samples).
        method: ``"exact"`` (per-sample gradients) or ``"two_batch"`` (mini-batch gradient norms
            only; for models where per-sample gradients are too costly).
        b_small, b_big: the two batch sizes of ``"two_batch"`` (defaults ``max(1, N // 64)`` and
            ``max(b_small + 1, N // 4)``), ``1 ≤ b_small < b_big ≤ N``; batches are drawn with
            replacement, for which the estimator is unbiased.
        num_pairs: independent (small, big) batch pairs averaged (``"two_batch"``, ≥ 2).
        seed, generator: randomness of the batches (``"two_batch"``; the generator wins, else a
            fresh generator seeded with ``seed``, default 0).

    Returns:
        :class:`GradientNoiseScale`. ``b_simple`` is ``inf`` when ``‖∇L‖² = 0`` (exact) and may be
        negative or ``inf`` for a two-batch estimate whose ``‖∇L‖²`` estimate is not positive
        (the noise dominates: draw more pairs or use larger batches).

    Raises:
        ValueError: for an unknown method or batch sizes outside ``[1, N]`` / not increasing.
        TypeError: a generator or seed of another type.

    Source: McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training"
    (2018), Eq. 2.9 (B_simple) and Appendix A.1 (the two-batch estimator).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
        >>> problem = sgdnoise.Problem(nn.Linear(3, 1), nn.functional.mse_loss, x, y)
        >>> gns = sgdnoise.gradient_noise_scale(problem)
        >>> gns.b_simple > 0
        True
    """
    N = problem.num_samples
    if method == "exact":
        tr, gsq = _exact(problem)
        b = tr / gsq if gsq > 0 else float("inf")
        return GradientNoiseScale(b, tr, gsq, "exact", 0.0, 0.0, 0.0, 0, None, None)
    if method != "two_batch":
        raise ValueError(f"method must be 'exact' or 'two_batch', got {method!r}")
    if N < 2:
        raise ValueError("method='two_batch' needs N >= 2 samples (two different batch sizes)")
    bs = _check_size("b_small", max(1, N // 64) if b_small is None else b_small, N)
    bb = _check_size("b_big", max(bs + 1, N // 4) if b_big is None else b_big, N)
    if bb <= bs:
        raise ValueError(f"b_big must be larger than b_small, got b_small={bs}, b_big={bb}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 2:
        raise ValueError(f"num_pairs must be an integer >= 2, got {num_pairs!r}")
    return _two_batch(problem, bs, bb, num_pairs, resolve_generator(seed, generator))


def _two_batch(
    problem: Problem, bs: int, bb: int, num_pairs: int, gen: torch.Generator
) -> GradientNoiseScale:
    """McCandlish et al.'s unbiased estimates of ``‖∇L‖²`` and ``Tr Σ₁`` from the squared norms
    of mean gradients of ``num_pairs`` (size-bs, size-bb) batch pairs drawn with replacement."""
    N = problem.num_samples
    g_est, s_est = [], []
    for _ in range(num_pairs):
        small = torch.randint(0, N, (bs,), generator=gen, device=gen.device).to(problem.device)
        big = torch.randint(0, N, (bb,), generator=gen, device=gen.device).to(problem.device)
        n_small = float(problem.gradient(indices=small).double().pow(2).sum())
        n_big = float(problem.gradient(indices=big).double().pow(2).sum())
        g_est.append((bb * n_big - bs * n_small) / (bb - bs))
        s_est.append((n_small - n_big) / (1.0 / bs - 1.0 / bb))
    G = torch.tensor(g_est, dtype=torch.float64)
    S = torch.tensor(s_est, dtype=torch.float64)
    gm, sm = float(G.mean()), float(S.mean())
    m = num_pairs
    g_se, s_se = float(G.std() / m**0.5), float(S.std() / m**0.5)
    if gm > 0:
        ratio = sm / gm
        # delta method for a ratio of two correlated means
        cov = float(((G - gm) * (S - sm)).sum() / (m - 1)) / m
        var = (s_se**2 - 2 * ratio * cov + ratio**2 * g_se**2) / gm**2
        se = max(var, 0.0) ** 0.5
    else:
        ratio, se = float("inf"), float("inf")
    return GradientNoiseScale(ratio, sm, gm, "two_batch", se, s_se, g_se, m, bs, bb)


def _exact(problem: Problem) -> tuple[float, float]:
    """``(Tr Σ₁, ‖ḡ‖²)`` from per-sample gradients (centred, never E[‖g‖²] − ‖ḡ‖²).

    One pass when all N rows fit in one chunk; otherwise two streamed passes (the mean first, then
    the centred squares), so memory stays at one chunk of rows.
    """
    N = problem.num_samples
    theta = problem.theta()
    chunk = problem.per_sample_chunk_size()
    if N <= chunk:
        G = problem.per_sample_gradients(theta=theta).double()
        gbar = G.mean(0)
        C = G - gbar
        return float((C * C).sum() / N), float(gbar @ gbar)
    ranges = [torch.arange(s, min(N, s + chunk), device=problem.device) for s in range(0, N, chunk)]
    total = torch.zeros(problem.dim, dtype=torch.float64, device=problem.device)
    for idx in ranges:
        total += problem.per_sample_gradients(idx, theta=theta).double().sum(0)
    gbar = total / N
    sq = 0.0
    for idx in ranges:
        C = problem.per_sample_gradients(idx, theta=theta).double() - gbar
        sq += float((C * C).sum())
    return sq / N, float(gbar @ gbar)
