"""Per-layer measurements: every quantity restricted to one layer's parameters.

For a block of parameters θ_l (the others held fixed), the Hessian and the noise covariance are
the diagonal blocks ``H_ll`` and ``Σ_ll`` of the whole-model matrices. Hence the traces add up
over the layers (``Σ_l Tr H_ll = Tr H``, ``Σ_l Tr Σ_ll = Tr Σ``), while ``Tr(H_ll Σ_ll)`` and the
top eigenvalue of ``H_ll`` describe the layer alone (the cross-layer terms of ``Tr(HΣ)`` are not
in any row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .linalg.hessian import HessianOperator
from .linalg.lanczos import top_eigenpairs
from .measures import escape_indicator
from .problem import Problem

__all__ = ["LayerTable", "by_layer"]


@dataclass(frozen=True)
class LayerTable:
    """One row per layer (module owning parameters of θ), in the model's order.

    Attributes:
        rows: dicts with ``layer`` (module name), ``type``, ``params`` (names), ``dim``, and the
            measured quantities (``tr_H``, ``tr_S``, ``tr_HS``, ``tr_HS_iso``, ``ratio``,
            ``lambda_max``; see :func:`sgdnoise.escape_indicator` for their conventions).
        batch_size: b of ``Σ_b``.
    """

    rows: list[dict[str, object]]
    batch_size: int
    columns: tuple[str, ...] = field(
        default=("tr_H", "tr_S", "tr_HS", "tr_HS_iso", "ratio", "lambda_max")
    )

    def total(self, key: str) -> float:
        """The sum of a column over the layers (meaningful for ``tr_H`` and ``tr_S``)."""
        return float(sum((float(cast(Any, r[key])) for r in self.rows), 0.0))

    def to_markdown(self) -> str:
        """The table as Markdown: one row per layer, one column per quantity."""
        head = "| layer | type | D | " + " | ".join(self.columns) + " |"
        sep = "|" + "---|" * (3 + len(self.columns))
        lines = [head, sep]
        for r in self.rows:
            vals = " | ".join(f"{float(r[c]):.4g}" for c in self.columns)  # type: ignore[arg-type]
            lines.append(f"| {r['layer']} | {r['type']} | {r['dim']} | {vals} |")
        return "\n".join(lines)

    __str__ = to_markdown


def _layers(problem: Problem) -> list[tuple[str, nn.Module, list[str]]]:
    """Modules that own parameters of θ directly, with those parameters' names."""
    chosen = set(problem.param_names)
    out = []
    for name, module in problem.model.named_modules():
        own = [
            f"{name}.{p}" if name else p
            for p, t in module.named_parameters(recurse=False)
            if t.requires_grad and (f"{name}.{p}" if name else p) in chosen
        ]
        if own:
            out.append((name or "(model)", module, own))
    return out


def by_layer(
    problem: Problem,
    batch_size: int = 1,
    *,
    num_samples: int | None = None,
    seed: int | None = 0,
    generator: torch.Generator | int | None = None,
    eigenvalues: bool = True,
    tol: float | None = None,
) -> LayerTable:
    """Tr H, Tr Σ_b, Tr(HΣ_b), its isotropic equivalent and λ_max of H for each layer.

    Each row restricts θ to one layer's parameters (``Problem(..., params=...)``) and calls
    :func:`sgdnoise.escape_indicator` on it (exact, or sampled with ``num_samples`` examples),
    plus the top Hessian eigenvalue of the block (Lanczos, ``tol``) when ``eigenvalues``.

    Args:
        problem: model, loss and data (θ may itself be a block: rows cover its layers).
        batch_size: b of ``Σ_b``.
        num_samples: ``None`` for exact ``Tr(HΣ_b)``, else the number of sampled examples.
        seed, generator: randomness for sampling, Hutch++ and Lanczos starts, the same seed for
            every row (the generator wins: an int is that seed, a generator its initial seed;
            else ``seed``, default 0).
        eigenvalues: also compute ``lambda_max`` per layer.
        tol: Lanczos tolerance (default per dtype, see :func:`sgdnoise.top_eigenpairs`).

    Returns:
        :class:`LayerTable`; ``table.total("tr_S")`` equals ``Tr Σ_b`` of the whole problem and
        ``table.total("tr_H")`` its ``Tr H`` — exactly in exact mode; with ``num_samples`` a
        layer's Tr H is a Hutch++ estimate when its D exceeds the sample's product budget
        (``tr_H_exact`` per row says which).

    Raises:
        ValueError: b or ``num_samples`` outside their ranges (as :func:`escape_indicator`).
    """
    rows: list[dict[str, object]] = []
    if generator is not None:
        seed = generator if isinstance(generator, int) else int(generator.initial_seed())
    seed = 0 if seed is None else seed
    for name, module, names in _layers(problem):
        sub = problem.restrict(names)
        ind = escape_indicator(sub, batch_size, num_samples=num_samples, generator=seed)
        row: dict[str, object] = {
            "layer": name,
            "type": type(module).__name__,
            "params": names,
            "dim": sub.dim,
            "tr_H": ind.tr_H,
            "tr_S": ind.tr_S,
            "tr_HS": ind.tr_HS,
            "tr_HS_iso": ind.tr_HS_iso,
            "ratio": ind.ratio,
            "tr_H_exact": ind.tr_H_exact,
            "tr_HS_stderr": ind.stderr,
        }
        if eigenvalues:
            lam = top_eigenpairs(HessianOperator(sub), 1, tol=tol, generator=seed)
            row["lambda_max"] = float(lam.eigenvalues[0])
        else:
            row["lambda_max"] = float("nan")
        rows.append(row)
    return LayerTable(rows, batch_size)
