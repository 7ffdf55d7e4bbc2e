"""Orthonormalisation for the solvers on ``[D, m]`` blocks of millions of rows: inner products
accumulated in float64 across row blocks (:func:`inner64`), block Gram–Schmidt against a basis with random refills
(:func:`orthonormalize_against`, Lanczos), and an in-place basis of a large sketch
(:func:`orthonormal_basis`, Hutch++)."""

from __future__ import annotations

import torch

from .._utils import randn

#: Rows per block of :func:`inner64`: its float32 partial sums cover this many rows each.
INNER_ROWS = 1024


def inner64(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Aᵀ B`` (``A`` ``[D, p]``, ``B`` ``[D, q]``) as float64, with the sum over rows
    accumulated in float64 across blocks of :data:`INNER_ROWS` rows.

    One float32 inner product over millions of entries (a ResNet-18's D = 11.2M) loses up to
    ~1e-7–1e-4 of its value to accumulated rounding, which is what orthogonality and ``QᵀAQ``
    must not lose (a ResNet-18's Σ: the basis stopped being orthogonal and the Ritz values rose
    above the spectrum). Here each block of 1,024 rows is one batched float32 product (rounding
    ~ε·√1024 of its own part) and the block sums are added in float64, so the error no longer
    grows with D: ~1e-9 of ``‖a‖‖b‖`` where plain float32 gives ~1e-7, at the cost of one
    float32 product (no float64 copy of the blocks). float64 inputs: one float64 product.
    """
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A.T @ B
    D, R = A.shape[0], INNER_ROWS
    n = D // R * R
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    if n:
        parts = torch.bmm(A[:n].unflatten(0, (-1, R)).transpose(1, 2), B[:n].unflatten(0, (-1, R)))
        out += parts.sum(0, dtype=torch.float64)
    if n < D:
        out += A[n:].double().T @ B[n:].double()
    return out


def project_out(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``X − Q (Qᵀ X)`` with the coefficients ``Qᵀ X`` accumulated in float64."""
    if Q.shape[1] == 0:
        return X
    return torch.addmm(X, Q, inner64(Q, X).to(X.dtype), alpha=-1)  # one new block, not two


def orthonormalize_against(
    X: torch.Tensor, Q: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Columns spanning ``X`` minus its projection on ``Q``, orthonormal, with random refills.

    Classical Gram–Schmidt against ``Q`` (a second pass where the first cancelled more than
    1 − 1/√2 of a column's norm: "twice is enough"), then Gram–Schmidt (twice)
    within the block, column by column (and one more pass against ``Q`` where that cancelled
    as much of a column); every inner product and norm is accumulated in float64
    (:func:`inner64`), so the basis stays orthonormal to about the dtype's ε whatever D. A column
    whose part outside the span falls below ``1e3 ε`` of its norm (``X`` already inside span ``Q``:
    an invariant subspace was found; or the leftover is rounding) is replaced by a random
    direction, orthogonalised the same way, so the basis keeps growing.
    """
    D = X.shape[0]
    eps = torch.finfo(X.dtype).eps
    for attempt in range(4):
        ref = inner64(X, X).diagonal().sqrt().clamp_min(torch.finfo(X.dtype).tiny)
        X = project_out(X, Q)
        # the second pass only where the first cancelled much of a column (Daniel, Gragg,
        # Kaufman & Stewart 1976: a column that kept > 1/√2 of its norm is orthogonal to Q to
        # rounding after one pass — as Lanczos residuals, already orthogonal to Q, always are)
        if Q.shape[1] and bool((inner64(X, X).diagonal().sqrt() < 0.7071 * ref).any()):
            X = project_out(X, Q)
        cols: list[torch.Tensor] = []
        keep: list[bool] = []
        turned = False  # did the block's own Gram–Schmidt cancel much of a column?
        for j in range(X.shape[1]):
            x = X[:, j : j + 1]
            before = float(inner64(x, x)[0, 0]) ** 0.5 if cols else 0.0
            done = torch.cat(cols, dim=1) if cols else X[:, :0]
            for _ in range(2):
                x = project_out(x, done)
            norm = float(inner64(x, x)[0, 0]) ** 0.5
            turned = turned or (bool(cols) and norm < 0.7071 * before)
            keep.append(norm > 1e3 * eps * float(ref[j]))
            if keep[-1]:
                cols.append(x / norm)
        Qx = torch.cat(cols, dim=1) if cols else X[:, :0].clone()
        if all(keep):
            # One more pass against Q where the block's own orthogonalisation cancelled much of
            # a column (subtracting the block's other columns brings back their rounding-level
            # parts along Q, large relative to what is left only after a cancellation: the
            # same DGKS criterion; nothing moves for a single column).
            if Q.shape[1] and Qx.shape[1] > 1 and turned:
                Qx = project_out(Qx, Q)
                n = inner64(Qx, Qx).diagonal().sqrt().to(Qx.dtype)
                Qx = Qx / n[None, :]
            return Qx
        missing = len(keep) - len(cols)
        if attempt == 3 or Q.shape[1] + X.shape[1] > D:
            return Qx
        fresh = randn((D, missing), generator=generator, dtype=X.dtype, device=X.device)
        X = torch.cat([Qx, fresh], dim=1)
    return X  # pragma: no cover


#: Blocks up to this many bytes are orthonormalised by ``torch.linalg.qr`` (Householder), larger
#: ones in place (:func:`orthonormal_basis`): the QR of a ResNet-18 sketch (D = 11.2M, s = 33,
#: 1.5 GB) held three copies of it, 4.4 GB, the peak of a Hutch++ estimate of Tr H.
QR_COPY_MAX_BYTES = 2**26


def orthonormal_basis(A: torch.Tensor, max_copy_bytes: int | None = None) -> torch.Tensor:
    """An orthonormal basis ``Q`` ``[D, r]`` of span ``A`` (``A`` ``[D, s]``, D ≥ s).

    Up to ``max_copy_bytes`` (default :data:`QR_COPY_MAX_BYTES`): ``torch.linalg.qr(A)`` (r = s,
    ``A`` untouched). Above: written over ``A`` (its first r columns are returned as a view), with
    only ``[s, s]`` and ``[rows, s]`` temporaries: two passes of Gram orthogonalisation —
    ``G = AᵀA`` accumulated in float64, ``G = V Λ Vᵀ``, ``A ← A V Λ^{-1/2}`` a block of rows at a
    time (CholeskyQR2 with an eigendecomposition, so that a rank-deficient ``A`` loses its
    numerically null directions, ``λ ≤ max((100 ε)², 10⁻¹²) λ_max``, instead of failing); the second pass
    restores the orthogonality the first loses to rounding (‖QᵀQ − I‖ ≈ ε after it). r is the
    numerical rank (0 for ``A = 0``).

    Source: Fukaya, Nakatsukasa, Yanagisawa & Yamamoto, "CholeskyQR2" (2014).
    """
    limit = QR_COPY_MAX_BYTES if max_copy_bytes is None else max_copy_bytes
    if A.numel() * A.element_size() <= limit:
        return torch.linalg.qr(A)[0]
    # null directions: below the rounding of A's entries, or of the float64 Gram itself
    cut = max((100 * torch.finfo(A.dtype).eps) ** 2, 1e-12)
    for _ in range(2):
        s = A.shape[1]
        if s == 0:
            break
        lam, V = torch.linalg.eigh(inner64(A, A))
        keep = lam > cut * float(lam.max().clamp_min(0.0))
        T = (V[:, keep] / lam[keep].sqrt()[None, :]).to(A.dtype)
        r = T.shape[1]
        rows = max(1, (1 << 22) // s)
        for r0 in range(0, A.shape[0], rows):
            block = A[r0 : r0 + rows]
            block[:, :r] = block @ T
        A = A[:, :r]
    return A
