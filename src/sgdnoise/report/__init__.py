"""The reproduction report: a claims table with verdicts derived from the numbers, then one section
per figure (figure, settings, run time). Written as ``report.md`` and a self-contained
``report.html`` (figures embedded as base64 PNG). Reads only saved results; recomputes nothing.

Verdict rules (stated in the report too):

* **reproduced** — the claim's numeric test holds with the uncertainty stated in the row;
* **partly** — the direction holds but not the stated margin, or only for some of the cases;
* **not reproduced** — the direction does not hold;
* **not measurable** — an estimate the test needs has a sign or an interval that makes it
  meaningless (e.g. a negative Hutch++ estimate of Tr H); the row gives the reason;
* **not tested (smoke)** — the part ran with the smoke profile, whose sizes check the plumbing and
  cannot test a claim;
* **not run** — the experiment's results are missing from the output folder.

Every row also says what its verdict rests on (seeds, runs, instances); a verdict from one seed
is marked "indicative": a missing spread is never treated as a measured zero.

The HTML escapes every text it did not generate itself (results folders may hold anything), and
embeds only PNG files that lie inside the output folder.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._utils import atomic_write_text

__all__ = ["Claim", "claims", "write_report"]


@dataclass(frozen=True)
class Claim:
    """One row of the claims table (``basis``: what the verdict rests on, e.g. "3 seeds")."""

    experiment: str
    claim: str
    paper: str
    ours: str
    verdict: str
    rule: str
    basis: str = ""


VERDICTS = (
    "reproduced",
    "partly",
    "not reproduced",
    "not measurable",
    "not tested (smoke)",
    "not run",
)


def _seeds_basis(n: int, what: str = "seed") -> str:
    if n <= 0:
        return ""
    if n == 1:
        return f"1 {what} — indicative (no spread measured)"
    return f"{n} {what}s"


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _ms(entry: Any, key: str) -> tuple[float, float]:
    """(mean, std) of ``entry[key]`` whether it is a number or ``{"mean", "std"}``."""
    v = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(v, dict):
        return float(v.get("mean", math.nan)), float(v.get("std", 0.0) or 0.0)
    if isinstance(v, int | float):
        std = entry.get(f"{key}_std", 0.0) if isinstance(entry, dict) else 0.0
        return float(v), float(std or 0.0)
    return math.nan, math.nan


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean != mean:
        return "n/a"
    if std is None or std != std or std == 0:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


# ------------------------------------------------------------------------------------ toy
_TOY_ALIGNED = ("gld_leading", "gld_hessian", "gld_hessian_top1", "gld_full")
_TOY_ISO = ("gld_const", "gld_dynamic", "gld_diag")


def _short(k: str) -> str:
    return {"gld_full": "full Σ", "gld_hessian_top1": "1st eigvec"}.get(k, k.removeprefix("gld_"))


def _toy_claims(r: dict[str, Any]) -> list[Claim]:
    aligned = [k for k in _TOY_ALIGNED if k in r]
    iso = [k for k in _TOY_ISO if k in r]
    if not aligned or not iso:
        return []
    runs = int(next(iter(r.values())).get("runs", 0))
    basis = f"{runs} runs per dynamics (one seed of data and noise; 95% Wilson intervals)"
    a_low = min(r[k]["ci_low"] for k in aligned)
    i_high = max(r[k]["ci_high"] for k in iso)
    a_mean = min(r[k]["success_rate"] for k in aligned)
    i_mean = max(r[k]["success_rate"] for k in iso)
    verdict = (
        "reproduced" if a_low > i_high else ("partly" if a_mean > i_mean else "not reproduced")
    )
    ours = "; ".join(
        f"{_short(k)} {100 * r[k]['success_rate']:.0f}% [{100 * r[k]['ci_low']:.0f}, {100 * r[k]['ci_high']:.0f}]"
        for k in [*aligned, *iso, "gd"]
        if k in r
    )
    out = [
        Claim(
            "toy",
            "Fig. 1: noise aligned with H escapes the sharp minimum far more often than isotropic/"
            "diagonal noise of the same trace. Compares aligned: "
            + ", ".join(_short(k) for k in aligned)
            + " (full Σ is ours) against isotropic/diagonal: "
            + ", ".join(_short(k) for k in iso),
            "success rates not stated (a re-simulation of the released code gives leading ≈33%, "
            "Hessian ≈28%, 1st eigvec ≈39%, const/diag ≈0–1%)",
            ours,
            verdict,
            "reproduced if the lowest 95% Wilson lower bound among aligned dynamics exceeds the highest upper bound among isotropic/diagonal ones; partly if only the point estimates are ordered",
            basis,
        )
    ]
    have = [k for k in (*_TOY_ISO, *_TOY_ALIGNED) if k in r and "tr_HS" in r[k]]
    if len(have) >= 3:
        by_tr = sorted(have, key=lambda k: r[k]["tr_HS"])
        rates = [r[k]["success_rate"] for k in by_tr]
        pairs = [(i, j) for i in range(len(rates)) for j in range(i + 1, len(rates))]

        def tied(i: int, j: int) -> bool:  # Tr(HΣ) equal within 1%: either order agrees
            a, b = r[by_tr[i]]["tr_HS"], r[by_tr[j]]["tr_HS"]
            return abs(a - b) <= 0.01 * max(abs(a), abs(b))

        concordant = sum(1 for i, j in pairs if rates[j] > rates[i] or tied(i, j))
        discordant = [  # strictly reversed: the larger Tr(HΣ) escaped less often
            f"{_short(by_tr[j])} (Tr(HΣ) {r[by_tr[j]]['tr_HS']:.3g}, {100 * rates[j]:.0f}%) vs "
            f"{_short(by_tr[i])} ({r[by_tr[i]]['tr_HS']:.3g}, {100 * rates[i]:.0f}%)"
            for i, j in pairs
            if rates[j] < rates[i] and not tied(i, j)
        ]
        n_equal = sum(1 for i, j in pairs if rates[j] == rates[i] and not tied(i, j))
        frac = concordant / len(pairs)
        out.append(
            Claim(
                "toy",
                "Tr(HΣ) predicts the escape ranking. Compares every noisy dynamics that ran: "
                + ", ".join(_short(k) for k in reversed(by_tr)),
                "Tr(HΣ) at the sharp minimum: 1st eigvec 2.00 > Hessian 1.84 = leading 1.84 > "
                "const 1.10 = diag 1.10 (our computation on the poster's toy loss)",
                ", ".join(
                    f"{_short(k)} Tr(HΣ) {r[k]['tr_HS']:.3g} → {100 * r[k]['success_rate']:.0f}%"
                    for k in reversed(by_tr)
                )
                + f"; {concordant}/{len(pairs)} pairs ordered as Tr(HΣ)"
                + (f"; {n_equal} with equal success rates" if n_equal else "")
                + (f"; out of order: {'; '.join(discordant)}" if discordant else ""),
                "reproduced" if frac >= 0.8 else ("partly" if frac >= 0.5 else "not reproduced"),
                "fraction of dynamics pairs whose success rates are strictly ordered as their Tr(HΣ) (pairs with Tr(HΣ) within 1% count as agreeing): ≥ 0.8 reproduced, ≥ 0.5 partly",
                basis,
            )
        )
    return out


# ------------------------------------------------------------------------------ indicator
def _indicator_claims(r: dict[str, Any]) -> list[Claim]:
    widths = sorted((k for k in r if k.isdigit()), key=int)
    if not widths:
        return []
    n_seeds = min(int(r[w].get("num_valid_final", len(r[w].get("seeds", [])))) for w in widths)
    basis = _seeds_basis(n_seeds) + " per width"
    ratios = {w: _ms(r[w], "ratio_final") for w in widths}
    ok = all(m - 2 * s > 10 for m, s in ratios.values())
    some = all(m > 1 for m, _ in ratios.values())
    ours = ", ".join(f"h={w}: {_fmt(*ratios[w])}" for w in widths)
    out = [
        Claim(
            "indicator",
            "Fig. 4 left: SGD's noise escapes far faster than its isotropic equivalent, Tr(HΣ) ≫ Tr(HΣ̄), on one-hidden-layer networks (h = 32, 128, 512)",
            "magnitude not stated (released-code re-simulation: ratio ≈ 40 / 170 / 650)",
            "final Tr(HΣ)/Tr(HΣ̄): " + ours,
            "reproduced" if ok else ("partly" if some else "not reproduced"),
            "reproduced if every width's final ratio minus 2 std (over seeds) exceeds 10; partly if every ratio exceeds 1",
            basis,
        )
    ]
    if len(widths) >= 2:
        means = [ratios[w][0] for w in widths]
        grows = all(b > a for a, b in itertools.pairwise(means))
        out.append(
            Claim(
                "indicator",
                "Proposition 1: the advantage grows with the dimension D",
                "ratio = O(a·D^(2d−1)), d > 1/2",
                " < ".join(f"{m:.3g}" for m in means) + " (increasing width)",
                "reproduced" if grows else ("partly" if means[-1] > means[0] else "not reproduced"),
                "reproduced if the mean ratio increases strictly with width; partly if only the widest exceeds the narrowest",
                basis,
            )
        )
    alphas = {w: _ms(r[w], "alignment_final") for w in widths}
    if all(m == m for m, _ in alphas.values()):
        bounded = all(m - 2 * s > 0 for m, s in alphas.values())
        out.append(
            Claim(
                "indicator",
                "Proposition 2: SGD's noise is aligned with H, u₁ᵀΣu₁ ≥ a λ₁ TrΣ/TrH with a > 0",
                "a > 0 (constant not stated)",
                "final a: " + ", ".join(f"h={w}: {_fmt(*alphas[w])}" for w in widths),
                "reproduced" if bounded else "not reproduced",
                "reproduced if every width's final a minus 2 std is above 0",
                basis,
            )
        )
    return out


# ---------------------------------------------------------------------------------- prop1
def _prop1_claims(r: dict[str, Any]) -> list[Claim]:
    exps = r.get("exponents")
    if not isinstance(exps, dict) or not exps:
        return []
    rows, worst = [], math.inf
    for key in sorted(exps, key=float):
        e = exps[key]
        d = float(e.get("d", key))
        slopes = [float(v["slope"]) for v in e.get("rests", {}).values() if "slope" in v]
        if not slopes:
            continue
        target = 2 * d - 1
        worst = min(worst, min(slopes) - target)
        rows.append(f"d={d:.2f}: slope {min(slopes):.2f}–{max(slopes):.2f} (2d−1 = {target:.2f})")
    bound_ok = bool(r.get("all_bounds_hold"))
    dims = r.get("dims", [])
    span = f"D = {dims[0]}…{dims[-1]}" if dims else ""
    verdict = (
        "reproduced"
        if bound_ok and worst >= -0.05
        else ("partly" if bound_ok or worst >= -0.15 else "not reproduced")
    )
    return [
        Claim(
            "prop1",
            "Proposition 1: for ill-conditioned H and Σ aligned with coefficient a, Tr(HΣ)/Tr(HΣ̄) ≥ a·D/(k + D^(1−d))², growing like a·D^(2d−1)",
            "O(a·D^(2d−1)), d > 1/2",
            f"{span}, {r.get('num_instances', '?')} instances, bound holds in all: {bound_ok}; fitted log-log slopes "
            + "; ".join(rows),
            verdict,
            "reproduced if the bound holds in every instance and every fitted slope is at least 2d − 1 − 0.05; partly if one of the two holds (slopes within 0.15)",
            f"{r.get('num_instances', '?')} deterministic instances (exact traces)",
        )
    ]


# -------------------------------------------------------------------------------- fashion
_ALIGNED = ("sgd", "gld_leading", "gld_hessian", "gld_hessian_top1", "gld_full")
_ISO = ("gld_const", "gld_dynamic", "gld_diag")


def _fashion_claims(r: dict[str, Any]) -> list[Claim]:
    out = []
    meta = r.get("meta", {})
    n_seeds = len(meta.get("seeds", [])) or 1
    basis = _seeds_basis(n_seeds)
    gd_phase = r.get("gd_phase", {})
    acc = gd_phase.get("test_acc")
    if isinstance(acc, dict):
        m, s = float(acc.get("mean", math.nan)), float(acc.get("std", 0.0) or 0.0)
    elif isinstance(acc, list) and acc and isinstance(acc[-1], int | float):
        m, s = float(acc[-1]), 0.0
    elif isinstance(acc, int | float):
        m, s = float(acc), 0.0
    else:
        m, s = _ms(gd_phase, "final_test_acc")
    if m == m:
        out.append(
            Claim(
                "fashion",
                "GD on 1,000 clean + 200 randomly labelled FashionMNIST images reaches a poorly generalising minimum θ*_GD",
                "test accuracy ≈ 0.66 (read off the paper's figure; independent re-implementations ≈ 0.70)",
                f"test accuracy at θ*_GD: {_fmt(m, s)}",
                "reproduced"
                if abs(m - 0.66) <= 0.05
                else ("partly" if abs(m - 0.66) <= 0.1 else "not reproduced"),
                "reproduced within ±0.05 of 0.66, partly within ±0.10",
                basis,
            )
        )
    if "gd" not in r:
        return out
    gd_m, gd_s = _ms(r["gd"], "final_test_acc")
    gains = {k: _ms(r[k], "final_test_acc") for k in (*_ALIGNED, *_ISO) if k in r}
    spread = "" if n_seeds > 1 else " (one seed: no spread, so the margin is 0.005 alone)"

    def margin(k: str) -> float:
        m, s = gains[k]
        return m - gd_m - 2 * math.sqrt(s * s + gd_s * gd_s) - 0.005

    al = [k for k in _ALIGNED if k in gains]
    if al:
        better = [k for k in al if margin(k) > 0]
        up = [k for k in al if gains[k][0] > gd_m]
        verdict = "reproduced" if len(better) == len(al) else ("partly" if up else "not reproduced")
        out.append(
            Claim(
                "fashion",
                "Fig. 2 left: from θ*_GD, SGD and SGD-like anisotropic noise escape to minima with better test accuracy than GD. Compares with GD: "
                + ", ".join(_LABEL.get(k, k) for k in al),
                "test accuracy rises above GD's (figure; values not stated)",
                f"final test acc, GD {_fmt(gd_m, gd_s)}; "
                + ", ".join(f"{_LABEL.get(k, k)} {_fmt(*gains[k])}" for k in al),
                verdict,
                "reproduced if every aligned dynamics beats GD by more than 0.005 + 2 combined std; partly if some beat GD"
                + spread,
                basis,
            )
        )
    iso = [k for k in _ISO if k in gains]
    if iso:
        near = [
            k
            for k in iso
            if abs(gains[k][0] - gd_m) <= 0.01 + 2 * math.sqrt(gains[k][1] ** 2 + gd_s**2)
        ]
        out.append(
            Claim(
                "fashion",
                "Fig. 2 left: isotropic/diagonal noise stays near GD. Compares with GD: "
                + ", ".join(_LABEL.get(k, k) for k in iso),
                "curves stay with GD's (figure)",
                f"final test acc, GD {_fmt(gd_m, gd_s)}; "
                + ", ".join(f"{_LABEL.get(k, k)} {_fmt(*gains[k])}" for k in iso),
                "reproduced" if len(near) == len(iso) else ("partly" if near else "not reproduced"),
                "reproduced if every isotropic dynamics ends within 0.01 + 2 combined std of GD's test accuracy"
                + spread.replace("0.005", "0.01"),
                basis,
            )
        )
    sharp = {k: _ms(r[k], "sharpness_signed") for k in ("gd", *_ALIGNED) if k in r}
    if "gd" in sharp and len(sharp) > 1 and sharp["gd"][0] == sharp["gd"][0]:
        flatter = [k for k in sharp if k != "gd" and sharp[k][0] < sharp["gd"][0]]
        n_al = len(sharp) - 1
        out.append(
            Claim(
                "fashion",
                "Fig. 2 right: the aligned dynamics reach flatter minima (lower expected sharpness E[L(θ+ν)] − L(θ), σ = 0.01) than GD. Compares with GD: "
                + ", ".join(_LABEL.get(k, k) for k in sharp if k != "gd"),
                "sharpness decreases after the switch (figure)",
                ", ".join(f"{_LABEL.get(k, k)} {_fmt(*sharp[k])}" for k in sharp),
                "reproduced"
                if len(flatter) == n_al
                else ("partly" if flatter else "not reproduced"),
                "reproduced if every aligned dynamics ends with lower mean signed sharpness than GD; partly if some do",
                basis,
            )
        )
    out.extend(_fashion_indicator_claim(r, basis))
    return out


_LABEL = {
    "gd": "GD",
    "sgd": "SGD",
    "gld_const": "const",
    "gld_dynamic": "dynamic",
    "gld_diag": "diag",
    "gld_leading": "leading",
    "gld_hessian": "Hessian",
    "gld_hessian_top1": "1st eigvec",
    "gld_full": "full Σ (ours)",
    "gld_multiplicative": "multiplicative (ours)",
}


def _last_point(curves: Any, key: str) -> tuple[float | None, float | None]:
    """(value, Monte-Carlo standard error) at the last point of a saved curve."""
    c = (curves or {}).get(key) or {}
    vals = c.get("mean") or []
    errs = c.get("stderr") or [None] * len(vals)
    for v, e in zip(reversed(vals), reversed(errs), strict=False):
        if isinstance(v, int | float) and v == v:
            return float(v), (float(e) if isinstance(e, int | float) else None)
    return None, None


def _ratio_or_reason(curves: Any) -> tuple[float | None, str]:
    """Tr(HΣ)/Tr(HΣ̄) at the last measurement, or ``None`` and why it is not measurable."""
    hs, hs_se = _last_point(curves, "tr_HS")
    iso, iso_se = _last_point(curves, "tr_HS_iso")
    if hs is None or iso is None:
        return None, "not measured"
    if iso <= 0:
        return None, (
            f"the estimate of Tr(HΣ̄) = Tr(H)·Tr(Σ)/D is {iso:.3g} ≤ 0 (a negative Hutch++ "
            "estimate of Tr H), so the ratio has no meaning"
        )
    if iso_se is not None and iso - 2 * iso_se <= 0:
        return None, (
            f"the estimate of Tr(HΣ̄) = {iso:.3g} ± {iso_se:.2g} (standard error) does not exclude "
            "0, so the ratio is unbounded"
        )
    if hs <= 0 or (hs_se is not None and hs - 2 * hs_se <= 0):
        return None, f"the estimate of Tr(HΣ) = {hs:.3g} does not exclude 0"
    return hs / iso, ""


def _fashion_indicator_claim(r: dict[str, Any], basis: str) -> list[Claim]:
    gd_phase = r.get("gd_phase", {})
    gd_ratio, gd_why = _ratio_or_reason(gd_phase.get("curves"))
    sgd_ratio, sgd_why = _ratio_or_reason((r.get("sgd") or {}).get("curves"))
    have_sgd = "tr_HS" in ((r.get("sgd") or {}).get("curves") or {})
    if gd_why == "not measured" and (not have_sgd or sgd_why == "not measured"):
        return []
    parts = [
        f"at θ*_GD: {_fmt(gd_ratio) if gd_ratio is not None else 'not measurable — ' + gd_why}"
    ]
    if have_sgd:
        parts.append(
            "at the end of SGD: "
            + (_fmt(sgd_ratio) if sgd_ratio is not None else "not measurable — " + sgd_why)
        )
    reasons = [w for w in (gd_why, sgd_why if have_sgd else "") if w]
    measured = [v for v in (gd_ratio, sgd_ratio if have_sgd else None) if v is not None]
    if reasons:
        verdict = "not measurable"
    else:
        low = min(measured)
        verdict = "reproduced" if low > 10 else ("partly" if low > 1 else "not reproduced")
    return [
        Claim(
            "fashion",
            "Fig. 4 right: on the FashionMNIST CNN, Tr(HΣ) of SGD's noise far exceeds Tr(HΣ̄) along training (GD phase and SGD after the switch)",
            "Tr(HΣ) well above Tr(HΣ̄) (figure; values not stated)",
            "Tr(HΣ)/Tr(HΣ̄) " + "; ".join(parts),
            verdict,
            "reproduced if every measured ratio exceeds 10, partly if every one exceeds 1; not measurable if an estimate is ≤ 0 or within 2 standard errors of 0",
            basis,
        )
    ]


_CLAIMS: dict[str, Callable[[dict[str, Any]], list[Claim]]] = {
    "toy": _toy_claims,
    "indicator": _indicator_claims,
    "prop1": _prop1_claims,
    "fashion": _fashion_claims,
}

_TITLES = {
    "toy": "Fig. 1 — 2-D toy: escaping the sharp minimum",
    "indicator": "Fig. 4 (left) — the escape indicator on one-hidden-layer networks",
    "prop1": "Proposition 1, numerically",
    "fashion": "Fig. 2 and Fig. 4 (right) — FashionMNIST with corrupted labels",
}


def _part_profile(out: Path, name: str) -> str | None:
    """The profile a part ran with, from its saved configuration (``None`` if unknown)."""
    try:
        cfg = json.loads((out / name / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    value = cfg.get("preset") or cfg.get("profile")
    return str(value) if value else None


def claims(out: str | Path, *, profile: str | None = None) -> list[Claim]:
    """All claims with verdicts, from the saved results under ``out`` (missing parts: not run).

    A part that ran with the smoke profile (by its saved config, or ``profile`` when it records
    none) gets "not tested (smoke)": its sizes check the plumbing, not the claims.
    """
    out = Path(out)
    rows: list[Claim] = []
    for name, fn in _CLAIMS.items():
        r = _load(out, name)
        if r is None:
            why = (
                "results.json damaged"
                if (out / name / "results.json").exists()
                else "results.json missing"
            )
            rows.append(Claim(name, _TITLES[name], "", "", "not run", why))
            continue
        try:
            got = fn(r)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            got = [Claim(name, _TITLES[name], "", f"could not read results: {exc}", "not run", "")]
        got = got or [Claim(name, _TITLES[name], "", "no comparable numbers", "not run", "")]
        if (_part_profile(out, name) or profile) == "smoke":
            got = [
                dataclasses.replace(
                    c,
                    verdict="not tested (smoke)" if c.verdict != "not run" else c.verdict,
                    basis="smoke sizes: " + c.basis if c.basis else "smoke sizes",
                )
                for c in got
            ]
        rows.extend(got)
    return rows


def _settings(out: Path, name: str) -> str:
    path = out / name / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else cfg
    items = [f"`{k}` = {json.dumps(v)}" for k, v in cfg.items()] if isinstance(cfg, dict) else []
    return ", ".join(items)


def _figures(out: Path, name: str) -> list[Path]:
    """PNG figures of a part that lie inside the output folder (no link leads elsewhere)."""
    root = out.resolve()
    figs = []
    for fig in sorted((out / name).glob("*.png")):
        real = fig.resolve()
        if real.is_file() and real.is_relative_to(root):
            figs.append(fig)
    return figs


_SMOKE_LINE = (
    "**Smoke profile: this report checks the plumbing, not the claims.** Its sizes (a few runs, "
    "a few iterations, tiny data) are far too small to test any claim of the paper, so no verdict "
    "is given; run `sgdnoise reproduce --profile quick` (or `paper`) for verdicts."
)


def write_report(out: str | Path, *, profile: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out``."""
    out = Path(out)
    try:
        timings = json.loads((out / "timings.json").read_text())
    except (OSError, ValueError):
        timings = {}
    if not isinstance(timings, dict):
        timings = {}
    if profile is None:
        found = {t.get("profile") for t in timings.values() if isinstance(t, dict)}
        found |= {_part_profile(out, n) for n in _TITLES}
        found.discard(None)
        profile = found.pop() if len(found) == 1 else ("mixed" if found else None)
    rows = claims(out, profile=profile)
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    smoke = profile == "smoke" or (
        rows and all(r.verdict in ("not tested (smoke)", "not run") for r in rows)
    )
    blocks: list[tuple[str, Any]] = []

    def ours(text: str) -> None:
        blocks.append(("md", text))

    title = "# Reproduction report — The Anisotropic Noise in SGD (Zhu et al., ICML 2019)"
    if smoke:
        title = (
            "# Reproduction report (smoke profile: checks the plumbing, not the claims) — "
            "The Anisotropic Noise in SGD (Zhu et al., ICML 2019)"
        )
    ours(title)
    if smoke:
        ours(_SMOKE_LINE)
    ours(
        f"Profile: **{profile or '?'}**. "
        + ", ".join(f"{v}: {n}" for v, n in counts.items() if n or v in VERDICTS[:3])
    )
    ours(
        "Verdicts are computed from the numbers by the rule in each row (see `sgdnoise/report.py`), "
        "never written by hand; the column 'based on' says how many seeds or runs each rests on "
        "(one seed is only indicative). Paper numbers come from the poster and the paper (Zhu et "
        "al., ICML 2019); where the paper states no number, the row says so."
    )
    table = [
        "| experiment | claim | paper | ours | verdict | based on | rule |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.experiment, r.claim, r.paper, r.ours, f"**{r.verdict}**", r.basis, r.rule]
        table.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    ours("\n".join(table))
    for name, title in _TITLES.items():
        ours(f"## {title}")
        if not (out / name / "results.json").exists():
            ours("_Not run in this output folder._")
            continue
        t = timings.get(name, {})
        if isinstance(t, dict) and isinstance(t.get("seconds"), int | float):
            ours(
                f"Run time: {t['seconds']:.1f} s on {t.get('device', '?')} (profile {t.get('profile', '?')})."
            )
        try:
            text = (out / name / "summary.md").read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            text = re.sub(r"^#+ .*\n", "", text, count=1)  # drop its own title
            blocks.append(("text", text))
        for fig in _figures(out, name):
            blocks.append(("figure", (fig.stem, f"{name}/{fig.name}")))
        settings = _settings(out, name)
        if settings:
            blocks.append(("settings", settings))
    md_parts = []
    for kind, value in blocks:
        if kind in ("md", "text"):
            md_parts.append(value)
        elif kind == "figure":
            md_parts.append(f"![{value[0]}]({value[1]})")
        else:
            md_parts.append(f"<details><summary>Settings</summary>\n\n{value}\n\n</details>")
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n\n".join(md_parts) + "\n")
    html_path = out / "report.html"
    atomic_write_text(html_path, _to_html(blocks, out))
    return md_path, html_path


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    s = re.sub(r"(?<![\w])_(.+?)_(?=\W|$)", r"<i>\1</i>", s)
    return s


def _md_to_html(md: str) -> list[str]:
    """A small Markdown subset (headings, tables, lists, paragraphs) → HTML, escaping all text.

    Raw HTML and image syntax in ``md`` come out as visible, escaped text.
    """
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
            head = cells[0]
            data = (
                cells[2:]
                if len(cells) > 1 and all(set(c) <= set("-: ") for c in cells[1])
                else cells[1:]
            )
            vcol = head.index("verdict") if "verdict" in head else -1
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            for row in data:
                cls = ""
                verdict = row[vcol] if 0 <= vcol < len(row) else ""
                for v in VERDICTS:
                    if f"**{v}**" == verdict:
                        cls = re.sub(r"[^a-z]+", "-", v).strip("-")
                        break
                body.append(
                    (f'<tr class="{cls}">' if cls else "<tr>")
                    + "".join(f"<td>{_inline(c.replace(chr(92) + '|', '|'))}</td>" for c in row)
                    + "</tr>"
                )
            body.append("</table>")
            continue
        if line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- ") or line.startswith("* "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return body


def _to_html(blocks: list[tuple[str, Any]], out: Path) -> str:
    """The report's blocks → one self-contained HTML page.

    Text (ours or from the results folders) is escaped; figures are the PNGs listed by
    :func:`_figures` (inside ``out``), embedded as base64.
    """
    body: list[str] = []
    root = out.resolve()
    for kind, value in blocks:
        if kind in ("md", "text"):
            body += _md_to_html(value)
        elif kind == "figure":
            alt, rel = value
            path = (out / rel).resolve()
            if path.suffix == ".png" and path.is_file() and path.is_relative_to(root):
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(
                    f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/></figure>'
                )
        else:
            body.append(f"<details><summary>Settings</summary><p>{_inline(value)}</p></details>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}"
        "tr.reproduced td:nth-child(5){background:#d9f2d9}tr.partly td:nth-child(5){background:#fff2cc}"
        "tr.not-reproduced td:nth-child(5){background:#f8d0d0}tr.not-run td:nth-child(5){background:#eee}"
        "tr.not-measurable td:nth-child(5){background:#e8e0f0}tr.not-tested-smoke td:nth-child(5){background:#eee}"
        "img{max-width:100%}code{background:#f4f4f4;padding:0 2px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sgdnoise reproduction report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
