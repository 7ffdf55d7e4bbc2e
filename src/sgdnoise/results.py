"""Result objects of the measurements, and the one way they print.

Every result is a frozen dataclass: scalar fields are Python floats (ints, bools), vectors and
matrices are tensors or lists; ``to_dict()`` gives the fields (the JSON written by the
experiments), ``print(result)`` a short table — one quantity per line, ``value ± standard error``
where there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["Alignment", "EscapeIndicator", "ExpectedSharpness", "format_table"]

Row = tuple[str, object, "float | None"]


def _fmt(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_table(title: str, rows: Sequence[Row], note: str = "") -> str:
    """``title`` and one ``name  value ± stderr`` line per row (``± …`` only where the standard
    error is not ``None``), names aligned; ``note`` is appended to the title in parentheses."""
    head = f"{title} ({note})" if note else title
    width = max((len(name) for name, _, _ in rows), default=0)
    lines = [head]
    for name, value, se in rows:
        text = _fmt(value)
        if se is not None:
            text += f" ± {se:.2g}"
        lines.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, object]:
        """The fields as a dict (JSON-ready: floats, ints, bools, lists)."""
        return asdict(self)


def _ratio_stderr(ratio: float, parts: Sequence[tuple[float, float]]) -> float:
    """Delta-method standard error of a ratio of independent estimates ``(value, stderr)``."""
    rel = sum((se / v) ** 2 for v, se in parts if v != 0)
    return abs(ratio) * rel**0.5


@dataclass(frozen=True)
class EscapeIndicator(_Result):
    """Tr(HΣ_b) against its isotropic equivalent (Zhu et al., ICML 2019, Eq. 6 and Prop. 1).

    Attributes:
        tr_HS: ``Tr(H Σ_b)`` (exact, or an unbiased estimate when ``exact`` is False).
        tr_HS_iso: ``Tr(H Σ̄) = Tr(H) · Tr(Σ_b) / D``, with ``Σ̄ = (Tr Σ_b / D) I`` of equal trace.
        ratio: ``tr_HS / tr_HS_iso`` (dimensionless; > 1: Σ_b is aligned with the sharp
            directions of H).
        tr_H, tr_S: ``Tr(H)`` and ``Tr(Σ_b)`` (the latter always exact).
        dim: D. batch_size: b. num_samples: examples used for Tr(HΣ) (N when exact).
        exact: whether ``tr_HS`` is exact. stderr: its standard error (0.0 when exact).
        tr_H_exact: whether ``Tr(H)`` is exact (D products) or a Hutch++ estimate.
        tr_H_stderr: standard error of ``tr_H`` (0.0 when exact).
        ratio_stderr: (property) delta-method standard error of ``ratio`` from ``stderr`` and
            ``tr_H_stderr`` (independent draws; ``Tr Σ_b`` is exact).
    """

    tr_HS: float
    tr_HS_iso: float
    ratio: float
    tr_H: float
    tr_S: float
    dim: int
    batch_size: int
    num_samples: int
    exact: bool
    stderr: float
    tr_H_exact: bool
    tr_H_stderr: float

    @property
    def ratio_stderr(self) -> float:
        return _ratio_stderr(self.ratio, [(self.tr_HS, self.stderr), (self.tr_H, self.tr_H_stderr)])

    @property
    def tr_HS_iso_stderr(self) -> float:
        """Standard error of ``tr_HS_iso`` (from ``tr_H_stderr``)."""
        return self.tr_H_stderr * self.tr_S / self.dim

    def __str__(self) -> str:
        how = "exact" if self.exact else f"{self.num_samples} sampled examples"
        h_se = None if self.tr_H_exact else self.tr_H_stderr  # no "± 0" for exact quantities
        return format_table(
            "EscapeIndicator",
            [
                ("Tr(HΣ_b)", self.tr_HS, None if self.exact else self.stderr),
                (
                    "Tr(HΣ̄) isotropic",
                    self.tr_HS_iso,
                    None if h_se is None else self.tr_HS_iso_stderr,
                ),
                ("ratio", self.ratio, None if self.exact and h_se is None else self.ratio_stderr),
                ("Tr(H)", self.tr_H, h_se),
                ("Tr(Σ_b)", self.tr_S, None),
            ],
            f"D={self.dim}, b={self.batch_size}, {how}",
        )


@dataclass(frozen=True)
class Alignment(_Result):
    """Proposition 1's alignment of Σ_b with H (Zhu et al., ICML 2019, Prop. 1, condition 2).

    Attributes:
        a: ``u₁ᵀ Σ_b u₁ · Tr(H) / (λ₁ · Tr(Σ_b))`` (condition 2 holds with this coefficient).
        overlap: ``‖U_Hᵀ U_Σ‖_F² / k`` of the top-k eigenspaces (1 = identical, k/D = random).
        k: eigenspace dimension. lambda_1: top Hessian eigenvalue. u1_S_u1: ``u₁ᵀ Σ_b u₁``.
        tr_H, tr_S: traces; tr_H_exact: whether ``Tr(H)`` is exact.
        hessian_eigenvalues, noise_eigenvalues: top-k eigenvalues of H and Σ_b (descending).
        tr_H_stderr: standard error of ``tr_H`` (0.0 when exact; a Hutch++ estimate of the trace
            of a large indefinite Hessian can have a spread comparable to its value).
        a_stderr: (property) standard error of ``a`` from ``tr_H_stderr`` (``a`` is linear in
            ``Tr H``; λ₁, ``u₁ᵀΣu₁`` and ``Tr Σ_b`` are computed to the Lanczos tolerance / exactly).
    """

    a: float
    overlap: float
    k: int
    lambda_1: float
    u1_S_u1: float
    tr_H: float
    tr_S: float
    tr_H_exact: bool
    hessian_eigenvalues: list[float]
    noise_eigenvalues: list[float]
    tr_H_stderr: float = 0.0

    @property
    def a_stderr(self) -> float:
        return _ratio_stderr(self.a, [(self.tr_H, self.tr_H_stderr)])

    def __str__(self) -> str:
        h_se = None if self.tr_H_exact else self.tr_H_stderr
        return format_table(
            "Alignment",
            [
                ("a", self.a, None if h_se is None else self.a_stderr),
                (f"overlap (top-{self.k})", self.overlap, None),
                ("λ₁(H)", self.lambda_1, None),
                ("u₁ᵀΣu₁", self.u1_S_u1, None),
                ("Tr(H)", self.tr_H, h_se),
                ("Tr(Σ_b)", self.tr_S, None),
            ],
            f"k={self.k}, Tr(H) {'exact' if self.tr_H_exact else 'Hutch++'}",
        )


@dataclass(frozen=True)
class ExpectedSharpness(_Result):
    """Expected sharpness under isotropic Gaussian perturbations ν ~ N(0, σ² I) (Zhu et al.,
    ICML 2019, Sec. 5; Keskar et al., 2017).

    Attributes:
        signed: the poster's ``E_ν[L(θ+ν)] − L(θ)`` (Monte-Carlo mean, loss units).
        absolute: the released code's ``E_ν|L(θ+ν) − L(θ)|``.
        signed_stderr, absolute_stderr: standard errors of the two means.
        loss: ``L(θ)``. sigma: σ. num_samples: number of draws.
    """

    signed: float
    absolute: float
    signed_stderr: float
    absolute_stderr: float
    loss: float
    sigma: float
    num_samples: int

    def __str__(self) -> str:
        return format_table(
            "ExpectedSharpness",
            [
                ("E[L(θ+ν)] − L(θ)", self.signed, self.signed_stderr),
                ("E|L(θ+ν) − L(θ)|", self.absolute, self.absolute_stderr),
                ("L(θ)", self.loss, None),
            ],
            f"σ={self.sigma:g}, {self.num_samples} draws",
        )
