"""Proposition 1 numerically: anisotropic aligned noise beats its isotropic equivalent by
``Tr(HΣ)/Tr(HΣ̄) ≥ a·D/(k + D^{1−d})² ~ a·D^{2d−1}`` (Zhu et al., ICML 2019, Proposition 1).

Construction, for each dimension D and exponent d ∈ (1/2, 1]:

* **H** (PSD) has eigenvalues ``λ₁ = 1 ≥ … ≥ λ_k ≥ top_min`` (linearly spaced: k large ones) and a
  tail ``λ_{k+1}, …, λ_D`` linearly spaced in ``[tail_scale/2, tail_scale] · λ₁ D^{−d}`` — strictly
  below ``λ₁ D^{−d}`` (condition 1) and as heavy as condition 1 allows, so the bound is nearly
  attained. Its eigenbasis is random: ``Q`` is a product of ``rotations`` Householder reflections
  drawn from the seed, and ``H = Q diag(λ) Qᵀ`` is a matrix-free operator (O(D) per product), so D
  can reach 10⁴ without a D×D matrix.
* **Σ** (PSD, ``Tr Σ = 1``) is diagonal in the same basis: ``u₁ᵀΣu₁ = α`` with
  ``α = a λ₁ Tr Σ / Tr H`` — condition 2 holds *with equality*, coefficient exactly a — and the
  remaining ``1 − α`` spread over the other eigendirections as

  - ``isotropic``: ``(1 − α)/(D − 1)`` each (the rest of the noise is uninformative);
  - ``hessian``: ``∝ λ_j`` (SGD-like: the rest of the noise follows the curvature);
  - ``tail``: all on ``u_D``, the flattest direction (the worst case allowed by condition 2:
    ``Tr(HΣ)`` is then as small as the proposition permits).

For every instance the ratio is computed in closed form from the two spectra
(``Tr(HΣ) = Σ_j λ_j σ_j``, ``Tr(HΣ̄) = Tr H · Tr Σ / D``) and re-measured from the operators:
λ₁ and u₁ by :func:`sgdnoise.top_eigenpairs` (Lanczos) and ``a = u₁ᵀΣu₁ · Tr H/(λ₁ Tr Σ)`` for
every D, and, up to ``verify_max_dim``, all traces from the dense matrices the operators produce.
The two must agree to ~1e-8 (the Lanczos tolerance).

The proof gives ``ratio ≥ a D λ₁²/Tr(H)² ≥ a D/(k + D^{1−d})²`` (the second step uses
``Tr H ≤ λ₁(k + D^{1−d})``). Both bounds are recorded, and the fitted log-log slope of the ratio
against D is compared with the bound's slope over the same D range and with the asymptotic
``2d − 1``. For finite D the local slope of ``aD/(k + D^{1−d})²`` is
``1 − 2(1 − d) D^{1−d}/(k + D^{1−d})``, which exceeds 2d − 1 and approaches it only when
``D^{1−d} ≫ k``; for d = 1 it is exactly 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
import torch
from pydantic import Field

from .._stats import loglog_slope
from ..config import Distinct, ExperimentConfig, OneOf, experiment_config
from ..figures.prop1 import summary_markdown
from ..linalg import (
    HouseholderBasis,
    RotatedDiagonalOperator,
    hessian_trace,
    top_eigenpairs,
    tr_HS,
)
from ..runs import Progress, RunDir, num_threads

__all__ = [
    "NOISE_RESTS",
    "PRESETS",
    "HouseholderBasis",
    "Prop1Config",
    "Prop1Instance",
    "RotatedDiagonalOperator",
    "closed_form",
    "hessian_spectrum",
    "make_instance",
    "measure_instance",
    "noise_spectrum",
    "run",
]

NOISE_RESTS = ("isotropic", "hessian", "tail")
F64 = torch.float64


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


_DIMS: tuple[int, ...] = (100, 215, 464, 1000, 2154, 4642, 10000)


def _noise_rests() -> tuple[str, ...]:
    return NOISE_RESTS


@experiment_config("prop1")
class Prop1Config(ExperimentConfig):
    """Configuration of the Proposition 1 check; every field is a flag of ``sgdnoise prop1`` and a
    key of its ``--config`` TOML file.

    ``verify_max_dim``: up to this D every trace is recomputed from the dense operators (D
    products each, O(D²) memory); above it only λ₁, u₁ (Lanczos) and a are re-measured, with the
    traces of the spectra.
    """

    dims: Annotated[
        tuple[int, ...],
        Distinct(),
        Field(
            min_length=2, description="dimensions D, at least two (to fit a slope), each >= k + 2"
        ),
    ] = _DIMS
    exponents: Annotated[tuple[Annotated[float, Field(gt=0.5, le=1.0)], ...], Distinct()] = Field(
        default=(0.6, 0.7, 0.8, 0.9, 1.0),
        min_length=1,
        description="exponents d in (1/2, 1] of condition 1 (beyond 1 the bound's slope stays 1)",
    )
    k: int = Field(default=4, ge=1, description="number of large eigenvalues (k ≪ D)")
    a: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="alignment coefficient in (0, 1]; condition 2 holds with equality",
    )
    tail_scale: float = Field(
        default=0.99,
        gt=0.0,
        lt=1.0,
        description="largest tail eigenvalue as a fraction of λ₁D^(−d), in (0, 1) (strictly below it)",
    )
    top_min: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="smallest of the k large eigenvalues (λ₁ = 1), in (0, 1]",
    )
    noise_rests: Annotated[tuple[Annotated[str, OneOf(_noise_rests)], ...], Distinct()] = Field(
        default=NOISE_RESTS,
        min_length=1,
        description="how Σ spreads the weight not on u₁ (the first is drawn in the figure's left panel)",
    )
    rotations: int = Field(
        default=3, ge=1, description="Householder reflections in the random eigenbasis"
    )
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        default=(0,),
        min_length=1,
        max_length=1,
        description="seed of the random eigenbases (one value)",
    )
    verify_max_dim: int = Field(
        default=2200,
        ge=0,
        description="largest D whose Tr H, Tr Σ and Tr(HΣ) are also recomputed from dense matrices, to check the closed forms",
    )
    lanczos_tol: float | None = Field(
        default=None,
        gt=0,
        description="relative residual tolerance of Lanczos (none: library default)",
    )
    threads: int | None = Field(default=1, ge=1, description="torch intra-op threads while running (none: leave as is)")  # fmt: skip

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Prop1Config:
        for D in self.dims:
            if D < self.k + 2:
                raise ValueError(
                    f"every D must be an integer >= k + 2 = {self.k + 2} (k large eigenvalues "
                    f"plus a tail), got {D}"
                )
            for d in self.exponents:
                if self.top_min <= self.tail_scale * D ** (-d):
                    raise ValueError(
                        f"top_min = {self.top_min} must exceed the largest tail eigenvalue "
                        f"tail_scale·D^(−d) = {self.tail_scale * D ** (-d):.3g} (D = {D}, d = {d}); "
                        "raise top_min or use larger D"
                    )
        return self


PRESETS: dict[str, Prop1Config] = {
    "smoke": Prop1Config(dims=(20, 60, 200), exponents=(0.75, 1.0), noise_rests=("isotropic",)),
    "quick": Prop1Config(),
    "paper": Prop1Config(),
}


# --------------------------------------------------------------------------------------------
# The construction
# --------------------------------------------------------------------------------------------


def hessian_spectrum(
    dim: int, d: float, k: int, *, tail_scale: float = 0.99, top_min: float = 0.5
) -> torch.Tensor:
    """Eigenvalues of H, descending ``[D]``: k large ones from 1 to ``top_min``, and a tail in
    ``[tail_scale/2, tail_scale] · D^{−d}`` (strictly below ``λ₁ D^{−d}``)."""
    top = torch.linspace(1.0, top_min, k, dtype=F64) if k > 1 else torch.ones(1, dtype=F64)
    tail = tail_scale * dim ** (-d) * torch.linspace(1.0, 0.5, dim - k, dtype=F64)
    lam = torch.cat([top, tail])
    if not bool((lam[:-1] >= lam[1:]).all()):
        raise ValueError(
            f"the spectrum is not descending: top_min = {top_min} must exceed the largest tail "
            f"eigenvalue {float(tail[0]):.3g}"
        )
    return lam


def noise_spectrum(lam: torch.Tensor, a: float, rest: str = "isotropic") -> torch.Tensor:
    """Eigenvalues of Σ in H's eigenbasis, ``Tr Σ = 1``, with ``σ₁ = u₁ᵀΣu₁ = a λ₁ Tr Σ / Tr H``
    exactly and the remaining ``1 − σ₁`` spread as ``rest`` says (see the module docstring)."""
    if rest not in NOISE_RESTS:
        raise ValueError(f"rest must be one of {', '.join(NOISE_RESTS)}, got {rest!r}")
    D = lam.shape[0]
    tr_h = lam.sum()
    alpha = a * lam[0] / tr_h
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"a = {a} is infeasible here: u₁ᵀΣu₁ = {float(alpha):.3g} Tr Σ > Tr Σ")
    sig = torch.zeros(D, dtype=F64)
    sig[0] = alpha
    if rest == "isotropic":
        sig[1:] = (1.0 - alpha) / (D - 1)
    elif rest == "hessian":
        sig[1:] = (1.0 - alpha) * lam[1:] / (tr_h - lam[0])
    else:
        sig[-1] = 1.0 - alpha
    return sig


def closed_form(lam: torch.Tensor, sig: torch.Tensor) -> dict[str, float]:
    """Ratio and alignment from the two spectra in a shared eigenbasis (``sig[0]`` along u₁)."""
    D = lam.shape[0]
    tr_h, tr_s = float(lam.sum()), float(sig.sum())
    tr_hs = float((lam * sig).sum())
    tr_hs_iso = tr_h * tr_s / D
    return {
        "tr_HS": tr_hs,
        "tr_HS_iso": tr_hs_iso,
        "ratio": tr_hs / tr_hs_iso,
        "tr_H": tr_h,
        "tr_S": tr_s,
        "a": float(sig[0]) * tr_h / (float(lam[0]) * tr_s),
    }


@dataclass(frozen=True)
class Prop1Instance:
    """One synthetic (H, Σ) pair.

    Attributes:
        H, Sigma: matrix-free operators ``Q diag(λ) Qᵀ`` and ``Q diag(σ) Qᵀ``.
        eigenvalues, noise_eigenvalues: λ (descending) and σ, in the shared eigenbasis.
        basis: Q. dim, d, k, a, rest: the parameters.
    """

    H: RotatedDiagonalOperator
    Sigma: RotatedDiagonalOperator
    eigenvalues: torch.Tensor
    noise_eigenvalues: torch.Tensor
    basis: HouseholderBasis
    dim: int
    d: float
    k: int
    a: float
    rest: str

    @property
    def u1(self) -> torch.Tensor:
        """The top eigenvector of H, ``Q e₁``."""
        return self.basis.column(0)

    @property
    def bound(self) -> float:
        """Proposition 1's lower bound ``a D / (k + D^{1−d})²``."""
        return self.a * self.dim / (self.k + self.dim ** (1.0 - self.d)) ** 2

    @property
    def spectral_bound(self) -> float:
        """The sharper intermediate bound ``a D λ₁² / Tr(H)²``."""
        lam = self.eigenvalues
        return self.a * self.dim * float(lam[0]) ** 2 / float(lam.sum()) ** 2


def make_instance(
    dim: int,
    d: float,
    k: int,
    a: float,
    rest: str = "isotropic",
    *,
    generator: torch.Generator,
    tail_scale: float = 0.99,
    top_min: float = 0.5,
    rotations: int = 3,
    basis: HouseholderBasis | None = None,
) -> Prop1Instance:
    """Build H and Σ satisfying Proposition 1's conditions (see the module docstring)."""
    lam = hessian_spectrum(dim, d, k, tail_scale=tail_scale, top_min=top_min)
    sig = noise_spectrum(lam, a, rest)
    Q = HouseholderBasis(dim, rotations, generator=generator) if basis is None else basis
    return Prop1Instance(
        H=RotatedDiagonalOperator(Q, lam),
        Sigma=RotatedDiagonalOperator(Q, sig),
        eigenvalues=lam,
        noise_eigenvalues=sig,
        basis=Q,
        dim=dim,
        d=d,
        k=k,
        a=a,
        rest=rest,
    )


def measure_instance(
    inst: Prop1Instance,
    *,
    dense: bool = True,
    generator: torch.Generator | int = 0,
    tol: float | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ratio and alignment recomputed from the operators (not from the known spectra).

    λ₁ and u₁ come from :func:`sgdnoise.top_eigenpairs` (Lanczos on ``H``, O(D) per product), and
    ``a = u₁ᵀ(Σ u₁) · Tr H / (λ₁ Tr Σ)``. With ``dense=True`` the traces ``Tr H``, ``Tr Σ`` and
    ``Tr(HΣ)`` come from :func:`sgdnoise.hessian_trace` and :func:`sgdnoise.tr_HS` on the
    operators (exact, D products each; small D only); otherwise the (basis-invariant) traces of the spectra are used and only
    λ₁, u₁ and ``u₁ᵀΣu₁`` are measured. ``cache`` (a dict) shares the H-only work between Σ's
    with the same H.
    """
    cache = {} if cache is None else cache
    if "top" not in cache:
        vals, vecs = top_eigenpairs(inst.H, 1, generator=generator, tol=tol)
        cache["top"] = (float(vals[0]), vecs[:, 0])
    lam1, u1 = cache["top"]
    out: dict[str, Any] = {"lambda_1": lam1, "dense": dense}
    if dense:  # the library's exact routes on the operators (D products each)
        if "tr_H" not in cache:
            cache["tr_H"] = hessian_trace(inst.H, exact_max_dim=inst.dim)[0]
        tr_H, tr_S = cache["tr_H"], hessian_trace(inst.Sigma, exact_max_dim=inst.dim)[0]
        tr = float(tr_HS(inst.H, inst.Sigma, exact_max_dim=inst.dim))
        tr_HS_iso = tr_H * tr_S / inst.dim
        out.update(tr_HS=tr, tr_HS_iso=tr_HS_iso, ratio=tr / tr_HS_iso, tr_H=tr_H, tr_S=tr_S)
    else:
        tr_H = float(inst.eigenvalues.sum())
        tr_S = float(inst.noise_eigenvalues.sum())
    # Proposition 1, condition 2: u₁ᵀΣu₁ ≥ a λ₁ Tr Σ / Tr H.
    out["a"] = float(u1 @ (inst.Sigma @ u1)) * tr_H / (lam1 * tr_S)
    return out


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def run(
    config: Prop1Config,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run the check and write the run directory (no figures); returns ``results.json``.

    Everything runs on the CPU in float64 (``device`` is accepted for a uniform interface and
    ignored; ``config.json`` records ``"cpu"``).

    Args:
        config: the configuration (validated here).
        out: run directory to write.
        device: ignored (see above). progress: show a progress line.
        profile: the preset's name, recorded in ``config.json``.

    Returns:
        ``results.json``'s content: ``dims``, ``k``, ``a``, ``all_bounds_hold``,
        ``max_numeric_rel_err`` and ``exponents`` mapping each d (a string) to
        ``asymptotic_slope`` (2d − 1), ``bound_slope`` (fitted over ``dims``), ``bounds`` and, per
        noise rest, ``ratios``, ``slope``, ``ratio_over_bound`` and ``bound_holds``. Also written:
        ``config.json``, ``env.json``, ``metrics.jsonl``/``.csv`` (one row per D, d and rest),
        ``meta.json`` and ``summary.md``. Figure: :func:`sgdnoise.figures.prop1.plot`.

    Raises:
        ValueError: an invalid config, or ``out`` holds a run with other settings.
    """
    del device  # CPU only
    config = config.validate()
    rd = RunDir(out)
    rd.refuse_other_config(dataclasses.asdict(config), ignore=("device", "preset"))
    rd.clear_complete()
    t0 = time.perf_counter()
    rd.write_config({**dataclasses.asdict(config), "device": "cpu", "preset": profile})
    rd.write_env("cpu")
    rows: list[dict[str, Any]] = []
    bar = Progress(len(config.dims) * len(config.exponents), "prop1", enabled=progress)
    with num_threads(config.threads):
        _compute(config, rows, bar)
    results = _collect(config, rows)
    elapsed = time.perf_counter() - t0
    rd.write_jsonl("metrics.jsonl", rows)
    rd.write_csv("metrics.csv", rows)
    rd.write_json("results.json", results)
    rd.write_json("meta.json", {"seconds": elapsed, "device": "cpu"})
    rd.write_text(
        "summary.md",
        summary_markdown(json.loads(json.dumps(dataclasses.asdict(config))), results, elapsed),
    )
    rd.mark_complete("prop1", config)
    return results


def _compute(config: Prop1Config, rows: list[dict[str, Any]], bar: Progress) -> None:
    for di, D in enumerate(config.dims):
        gen = torch.Generator().manual_seed(config.seeds[0] * 1_000_003 + di)
        basis = HouseholderBasis(D, config.rotations, generator=gen)
        verify = D <= config.verify_max_dim
        for d in config.exponents:
            shared: dict[str, Any] = {}
            for rest in config.noise_rests:
                inst = make_instance(
                    D, d, config.k, config.a, rest, generator=gen, tail_scale=config.tail_scale,
                    top_min=config.top_min, basis=basis,
                )  # fmt: skip
                cf = closed_form(inst.eigenvalues, inst.noise_eigenvalues)
                row: dict[str, Any] = {
                    "dim": D,
                    "d": d,
                    "rest": rest,
                    "k": config.k,
                    "a": config.a,
                    **{name: v for name, v in cf.items() if name != "a"},
                    "a_exact": cf["a"],
                    "bound": inst.bound,
                    "spectral_bound": inst.spectral_bound,
                    "lambda_k1_over_threshold": float(inst.eigenvalues[config.k])
                    / (float(inst.eigenvalues[0]) * D ** (-d)),
                }
                row["bound_holds"] = bool(cf["ratio"] >= inst.spectral_bound >= inst.bound)
                num = measure_instance(
                    inst, dense=verify, generator=gen, tol=config.lanczos_tol, cache=shared
                )
                errs = [_rel(num["a"], cf["a"]), _rel(num["lambda_1"], float(inst.eigenvalues[0]))]
                if verify:
                    errs += [_rel(num["ratio"], cf["ratio"]), _rel(num["tr_H"], cf["tr_H"])]
                row.update(
                    ratio_numeric=num.get("ratio"),
                    a_numeric=num["a"],
                    lambda_1_numeric=num["lambda_1"],
                    traces_numeric=verify,
                    numeric_rel_err=max(errs),
                )
                rows.append(row)
            bar.update(1, postfix=f"D={D} d={d}")


def _collect(config: Prop1Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    dims = list(config.dims)
    per_d: dict[str, Any] = {}
    for d in config.exponents:
        sel = [r for r in rows if r["d"] == d]
        bounds = [next(r["bound"] for r in sel if r["dim"] == D) for D in dims]
        spectral = [next(r["spectral_bound"] for r in sel if r["dim"] == D) for D in dims]
        entry: dict[str, Any] = {
            "d": d,
            "asymptotic_slope": 2 * d - 1,
            "bound_slope": loglog_slope(dims, bounds),
            "bound_local_slope_at_max_dim": 1
            - 2 * (1 - d) * max(dims) ** (1 - d) / (config.k + max(dims) ** (1 - d)),
            "spectral_bound_slope": loglog_slope(dims, spectral),
            "bounds": bounds,
            "spectral_bounds": spectral,
            "rests": {},
        }
        for rest in config.noise_rests:
            rr = [next(r for r in sel if r["dim"] == D and r["rest"] == rest) for D in dims]
            ratios = [r["ratio"] for r in rr]
            entry["rests"][rest] = {
                "ratios": ratios,
                "ratios_numeric": [r["ratio_numeric"] for r in rr],
                "slope": loglog_slope(dims, ratios),
                "ratio_over_bound": [x / b for x, b in zip(ratios, bounds, strict=True)],
                "bound_holds": all(r["bound_holds"] for r in rr),
                "a_numeric": [r["a_numeric"] for r in rr],
            }
        per_d[f"{d:g}"] = entry
    errs = [r["numeric_rel_err"] for r in rows if r["numeric_rel_err"] is not None]
    return {
        "dims": dims,
        "k": config.k,
        "a": config.a,
        "noise_rests": list(config.noise_rests),
        "decades": math.log10(max(dims) / min(dims)),
        "all_bounds_hold": all(r["bound_holds"] for r in rows),
        "max_numeric_rel_err": max(errs) if errs else None,
        "num_dense": sum(1 for r in rows if r["traces_numeric"]),
        "num_instances": len(rows),
        "exponents": per_d,
    }
