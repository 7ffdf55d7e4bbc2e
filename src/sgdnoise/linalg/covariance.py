"""The covariance ``Σ_b`` of SGD's mini-batch gradient, as a matrix-free operator.

Normalisation (used everywhere in sgdnoise):

* per-sample gradients ``g_i = ∇ℓ(x_i; θ)``, mean ``ḡ = ∇L(θ) = (1/N) Σ_i g_i``, centred
  ``c_i = g_i − ḡ``;
* **per-sample covariance** ``Σ_1 = (1/N) Σ_i c_i c_iᵀ`` (divisor N: the population covariance of
  drawing one sample uniformly);
* **mini-batch covariance** of the mean gradient of b samples: ``Σ_b = Σ_1 / b`` when the batch is
  drawn with replacement, ``Σ_b = Σ_1 · (N − b) / (b (N − 1))`` without replacement (b = N gives 0).

This is *gradient-level* noise: an SGD step ``θ ← θ − η g_B`` equals ``θ − η(∇L + n)`` with
``Cov(n) = Σ_b``, so the parameter-level covariance of one step is ``η² Σ_b``.

Centring always happens on the per-sample gradients (or on the N-vector ``G v``) before any
product, never as ``E[ggᵀ] − ḡḡᵀ``, which loses precision in float32 near a minimum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import vjp

from .._data import batch_size_of
from ..problem import MAX_COLUMNS, Problem
from ..problem._helpers import map_columns
from .operators import LinearOperator

__all__ = ["GradientNoiseCovariance", "batch_scale", "gradient_noise_covariance"]


#: ``materialize=None`` stores the N×D centred gradients when they hold at most this many numbers.
#: Read at call time by every user (the noise structures and :class:`~sgdnoise.GLD` too), so
#: lowering it (e.g. in a test, ``monkeypatch.setattr(covariance, "MATERIALIZE_LIMIT", 0)``)
#: switches them all to streaming.
MATERIALIZE_LIMIT = 2**27


def batch_scale(num_samples: int, batch_size: int, replacement: bool = True) -> float:
    """The factor s with ``Σ_b = s · Σ_1``: ``1/b`` with replacement, ``(N−b)/(b(N−1))`` without.

    Args:
        num_samples: N. batch_size: b ∈ [1, N]. replacement: how mini-batches are drawn.

    Returns:
        s as a Python float (0.0 for b = N without replacement).

    Raises:
        ValueError: if ``batch_size`` is not an integer in ``[1, N]``.
    """
    N = int(num_samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= N:
        raise ValueError(
            f"batch_size must be an integer in [1, N] = [1, {N}] (the mini-batch size whose "
            f"gradient noise is measured), got {batch_size!r}"
        )
    if replacement:
        return 1.0 / batch_size
    if N == 1:
        return 0.0
    return (N - batch_size) / (batch_size * (N - 1))


class GradientNoiseCovariance(LinearOperator):
    """``Σ_b = s · (1/N) Σ_i c_i c_iᵀ`` with ``c_i = g_i − ḡ`` and ``s`` = :func:`batch_scale`.

    Two storage modes, same numbers:

    * **materialised** (``centered`` holds the ``[N, D]`` matrix of ``c_i``): products are two
      matrix products; ``trace`` and ``diagonal`` are exact sums of squares;
    * **streaming** (``centered is None``, for models where N·D numbers do not fit): ``Σ_b V`` is
      one forward-mode pass (``C V`` as Jacobian-vector products of the per-sample losses, centred
      over samples) and one reverse pass (``Cᵀ W``) per data chunk; ``trace``/``diagonal`` stream
      per-sample gradients chunk by chunk.

    Attributes:
        problem, batch_size, replacement, scale (``s``), theta (snapshot ``[D]``),
        mean_gradient (``ḡ`` ``[D]``), centered (``[N, D]`` or ``None``).
    """

    psd = True

    def __init__(
        self,
        problem: Problem,
        batch_size: int = 1,
        replacement: bool = True,
        *,
        materialize: bool | None = None,
        per_sample: torch.Tensor | None = None,
        overwrite_per_sample: bool = False,
    ) -> None:
        super().__init__(problem.dim, problem.dtype, problem.device)
        self.problem = problem
        self.batch_size = batch_size
        self.replacement = bool(replacement)
        self.scale = batch_scale(problem.num_samples, batch_size, replacement)
        self.theta = problem.theta()
        N, D = problem.num_samples, problem.dim
        if materialize is None:
            materialize = per_sample is not None or N * D <= MATERIALIZE_LIMIT
        self.centered: torch.Tensor | None
        if materialize:
            G = problem.per_sample_gradients(theta=self.theta) if per_sample is None else per_sample
            if G.shape != (N, D):
                raise ValueError(f"per_sample must have shape [{N}, {D}], got {list(G.shape)}")
            self.mean_gradient = G.mean(0)
            if overwrite_per_sample and per_sample is not None:
                # The caller hands the buffer over: centre it in place (no [N, D] copy).
                self.centered = G.sub_(self.mean_gradient)
            else:
                self.centered = G - self.mean_gradient
        else:
            self.mean_gradient = problem.gradient(self.theta)
            self.centered = None
        self._trace: torch.Tensor | None = None
        self._diag: torch.Tensor | None = None

    def __repr__(self) -> str:
        mode = "materialised" if self.centered is not None else "streaming"
        return (
            f"GradientNoiseCovariance(D={self.shape[0]}, N={self.problem.num_samples}, "
            f"batch_size={self.batch_size}, replacement={self.replacement}, {mode})"
        )

    # ------------------------------------------------------------------ factors
    def factor(self) -> torch.Tensor:
        """``L`` ``[D, N]`` with ``Σ_b = L Lᵀ`` (materialised mode only): ``L = √(s/N) · Cᵀ``.

        Sampling ``n = L z`` with ``z ~ N(0, I_N)`` gives Gaussian noise with covariance exactly
        ``Σ_b`` without forming a D×D matrix.
        """
        if self.centered is None:
            raise RuntimeError(
                "factor() needs the materialised per-sample gradients; build the operator with "
                "materialize=True (N·D numbers of memory), or use sample_factor_product(z), "
                "which streams"
            )
        return self.centered.T * (self.scale / self.problem.num_samples) ** 0.5

    def centered_rows(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The centred per-sample gradients ``c_i = g_i − ḡ`` of the samples ``indices`` as rows
        ``[n, D]`` (``None``: all N), at :attr:`theta`: read from the stored matrix, or computed
        (one per-sample gradient pass over those samples) when streaming."""
        if self.centered is not None:
            return self.centered if indices is None else self.centered[indices]
        return self.problem.per_sample_gradients(indices, theta=self.theta) - self.mean_gradient

    # ------------------------------------------------------------------ products
    def _streaming_products(self, V: torch.Tensor) -> torch.Tensor:
        """``(1/N) Cᵀ C V`` chunk by chunk, with Jacobian products of the per-sample losses.

        Columns are taken in blocks and samples in chunks sized by the problem's memory budget.
        """
        problem, theta, gbar = self.problem, self.theta, self.mean_gradient
        cols, rows = problem.plan_columns(min(MAX_COLUMNS, V.shape[1]))

        def fn(x: Any, y: Any) -> torch.Tensor:
            def f(th: torch.Tensor) -> torch.Tensor:
                # vmap over samples, a loop for layers without batching rules, or the loss's
                # own per-sample output (reduction='none')
                return problem.sample_losses(th, x, y)

            n = batch_size_of(x)
            pullback = vjp(f, theta)[1]
            out = []
            for j in range(0, V.shape[1], cols):
                Vj = V[:, j : j + cols]
                GV = problem.losses_jvp(theta, x, y, Vj)  # G V  [n, k]
                W = GV - (gbar @ Vj)[None, :]  # C V, centred sample by sample
                CtW = map_columns(lambda w: pullback(w)[0], W)  # Gᵀ W
                # Cᵀ W = Gᵀ W − ḡ (1ᵀ W); the second term is tiny but kept for exactness.
                out.append((CtW - gbar[:, None] * W.sum(0)[None, :]) / n)
            return torch.cat(out, dim=1)

        return problem.reduce_mean(fn, rows=rows)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.centered is not None:
            C = self.centered
            return (C.T @ (C @ V)) * (self.scale / self.problem.num_samples)
        return self._streaming_products(V) * self.scale

    # ------------------------------------------------------------------ exact trace / diagonal
    def _streamed_squares(self) -> torch.Tensor:
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        chunk = self.problem.per_sample_chunk_size()
        N = self.problem.num_samples
        for start in range(0, N, chunk):
            idx = torch.arange(start, min(N, start + chunk), device=self.device)
            G = self.problem.per_sample_gradients(idx, theta=self.theta)
            total += ((G - self.mean_gradient) ** 2).sum(0)
        return total

    def diagonal(self) -> torch.Tensor:
        """Exact ``diag Σ_b = s · (1/N) Σ_i c_i ⊙ c_i``."""
        if self._diag is None:
            if self.centered is not None:
                # Squares summed a block of rows at a time: a small reused temporary instead of
                # a second [N, D] matrix.
                C = self.centered
                sq = torch.zeros(C.shape[1], dtype=C.dtype, device=C.device)
                rows = max(1, (1 << 19) // max(1, C.shape[1]))
                for start in range(0, C.shape[0], rows):
                    block = C[start : start + rows]
                    sq += (block * block).sum(0)
            else:
                sq = self._streamed_squares()
            self._diag = sq * (self.scale / self.problem.num_samples)
        return self._diag.clone()

    def trace(self) -> torch.Tensor:
        """Exact ``Tr Σ_b = s · (1/N) Σ_i ‖c_i‖²``."""
        if self._trace is None:
            if self._diag is None and self.centered is not None:
                norm = torch.linalg.vector_norm(self.centered)
                self._trace = norm * norm * (self.scale / self.problem.num_samples)
            else:
                self._trace = self.diagonal().sum()
        return self._trace.clone()

    def sample_factor_product(self, z: torch.Tensor) -> torch.Tensor:
        """Rows ``L z_j`` for ``z`` ``[num, N]`` with ``L = √(s/N) Cᵀ`` (:meth:`factor`), without
        forming ``L``.

        Materialised: ``(z C) √(s/N)``. Streaming: ``√(s/N) (Gᵀ z − ḡ (1ᵀ z))`` with ``Gᵀ z`` the
        gradient of the re-weighted loss ``Σ_i z_i ℓ_i`` at :attr:`theta` — one forward and one
        (num-column) backward pass over the data (:meth:`~sgdnoise.Problem.weighted_gradients`),
        never the ``[N, D]`` matrix. The two agree to rounding.
        """
        N = self.problem.num_samples
        if z.ndim != 2 or z.shape[1] != N:
            raise ValueError(f"z must have shape [num, N] = [num, {N}], got {list(z.shape)}")
        root = (self.scale / N) ** 0.5
        if self.centered is not None:
            return (z @ self.centered) * root
        Gz = self.problem.weighted_gradients(z, self.theta)[0] * N  # [num, D] = (Gᵀ z)ᵀ
        return (Gz - z.sum(1, keepdim=True) * self.mean_gradient[None, :]) * root


def gradient_noise_covariance(
    problem: Problem,
    batch_size: int = 1,
    replacement: bool = True,
    *,
    materialize: bool | None = None,
) -> GradientNoiseCovariance:
    """The covariance ``Σ_b`` of the mini-batch gradient of b samples, at the current θ.

    ``Σ_1 = (1/N) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ``; ``Σ_b = Σ_1 / b`` with replacement,
    ``Σ_1 (N − b)/(b (N − 1))`` without. Gradient-level: one SGD step with learning rate η has
    parameter covariance ``η² Σ_b``.

    Args:
        problem: model, loss and data.
        batch_size: b, in ``[1, N]``.
        replacement: whether the mini-batch is drawn with replacement.
        materialize: store the ``[N, D]`` centred per-sample gradients (fast, exact trace and
            diagonal) or stream them (memory O(D) per chunk, for very large models). ``None``
            chooses by size (at most 2^27 numbers are stored).

    Returns:
        A :class:`GradientNoiseCovariance` ``[D, D]`` (symmetric PSD operator; squared gradient
        units), with exact ``trace()`` and ``diagonal()``.

    Raises:
        ValueError: b outside ``[1, N]``. RuntimeError: BatchNorm/dropout in training mode.

    Source: Zhu et al. (ICML 2019), Sec. 3 (the SGD noise covariance); the without-replacement
    factor is the finite-population correction of sampling without replacement.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> S = sgdnoise.gradient_noise_covariance(
        ...     sgdnoise.Problem(model, nn.functional.mse_loss, x, y), batch_size=4)
        >>> bool(S.trace() >= 0)
        True
    """
    return GradientNoiseCovariance(problem, batch_size, replacement, materialize=materialize)
