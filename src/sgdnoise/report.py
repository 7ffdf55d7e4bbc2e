"""The reproduction report: a claims table with verdicts derived from the numbers, then one section
per figure (figure, settings, run time). Written as ``report.md`` and a self-contained
``report.html`` (figures embedded as base64 PNG). Reads only saved results; recomputes nothing.

Verdict rules (stated in the report too):

* **reproduced** — the claim's numeric test holds with the uncertainty stated in the row;
* **partly** — the direction holds but not the stated margin, or only for some of the cases;
* **not reproduced** — the direction does not hold;
* **not run** — the experiment's results are missing from the output folder.
"""

from __future__ import annotations

import base64
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
    """One row of the claims table."""

    experiment: str
    claim: str
    paper: str
    ours: str
    verdict: str
    rule: str


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
def _toy_claims(r: dict[str, Any]) -> list[Claim]:
    aligned = [k for k in ("gld_leading", "gld_hessian", "gld_hessian_top1") if k in r]
    iso = [k for k in ("gld_const", "gld_diag") if k in r]
    if not aligned or not iso:
        return []
    a_low = min(r[k]["ci_low"] for k in aligned)
    i_high = max(r[k]["ci_high"] for k in iso)
    a_mean = min(r[k]["success_rate"] for k in aligned)
    i_mean = max(r[k]["success_rate"] for k in iso)
    verdict = (
        "reproduced" if a_low > i_high else ("partly" if a_mean > i_mean else "not reproduced")
    )
    ours = "; ".join(
        f"{k.removeprefix('gld_')} {100 * r[k]['success_rate']:.0f}% [{100 * r[k]['ci_low']:.0f}, {100 * r[k]['ci_high']:.0f}]"
        for k in [*aligned, *iso, "gd"]
        if k in r
    )
    out = [
        Claim(
            "toy",
            "Fig. 1: noise aligned with H (leading, Hessian, 1st eigvec) escapes the sharp minimum far more often than isotropic/diagonal noise of the same trace",
            "success rates not stated (released-code re-simulation: leading ≈33%, Hessian ≈28%, 1st eigvec ≈39%, const/diag ≈0–1%)",
            ours,
            verdict,
            "reproduced if the lowest 95% Wilson lower bound among aligned dynamics exceeds the highest upper bound among const/diag; partly if only the point estimates are ordered",
        )
    ]
    have = [
        k
        for k in ("gld_const", "gld_diag", "gld_leading", "gld_hessian", "gld_hessian_top1")
        if k in r and "tr_HS" in r[k]
    ]
    if len(have) >= 3:
        by_tr = sorted(have, key=lambda k: r[k]["tr_HS"])
        rates = [r[k]["success_rate"] for k in by_tr]
        pairs = [(i, j) for i in range(len(rates)) for j in range(i + 1, len(rates))]

        def tied(i: int, j: int) -> bool:  # Tr(HΣ) equal within 1%: either order agrees
            a, b = r[by_tr[i]]["tr_HS"], r[by_tr[j]]["tr_HS"]
            return abs(a - b) <= 0.01 * max(abs(a), abs(b))

        concordant = sum(1 for i, j in pairs if rates[j] > rates[i] or tied(i, j))
        frac = concordant / len(pairs)
        out.append(
            Claim(
                "toy",
                "Tr(HΣ) predicts the escape ranking",
                "Tr(HΣ) at the sharp minimum: 1st eigvec 2.00 > Hessian 1.84 = leading 1.84 > const 1.10 = diag 1.10 (PAPER_NOTES)",
                ", ".join(f"{k.removeprefix('gld_')} {r[k]['tr_HS']:.3g}" for k in reversed(by_tr))
                + f"; {concordant}/{len(pairs)} pairs ordered as Tr(HΣ)",
                "reproduced" if frac >= 0.8 else ("partly" if frac >= 0.5 else "not reproduced"),
                "fraction of dynamics pairs whose success rates are strictly ordered as their Tr(HΣ) (pairs with Tr(HΣ) within 1% count as agreeing): ≥ 0.8 reproduced, ≥ 0.5 partly",
            )
        )
    return out


# ------------------------------------------------------------------------------ indicator
def _indicator_claims(r: dict[str, Any]) -> list[Claim]:
    widths = sorted((k for k in r if k.isdigit()), key=int)
    if not widths:
        return []
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
        )
    ]


# -------------------------------------------------------------------------------- fashion
_ALIGNED = ("sgd", "gld_leading", "gld_hessian", "gld_hessian_top1", "gld_full")
_ISO = ("gld_const", "gld_dynamic", "gld_diag")


def _fashion_claims(r: dict[str, Any]) -> list[Claim]:
    out = []
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
            )
        )
    if "gd" not in r:
        return out
    gd_m, gd_s = _ms(r["gd"], "final_test_acc")
    gains = {k: _ms(r[k], "final_test_acc") for k in (*_ALIGNED, *_ISO) if k in r}

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
                "Fig. 2 left: from θ*_GD, SGD and SGD-like anisotropic noise (leading, Hessian, 1st eigvec; our full Σ) escape to minima with better test accuracy than GD",
                "test accuracy rises above GD's (figure; values not stated)",
                f"final test acc, GD {_fmt(gd_m, gd_s)}; "
                + ", ".join(f"{k} {_fmt(*gains[k])}" for k in al),
                verdict,
                "reproduced if every aligned dynamics beats GD by more than 0.005 + 2 combined std; partly if some beat GD",
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
                "Fig. 2 left: isotropic/diagonal noise (const, dynamic, diag) stays near GD",
                "curves stay with GD's (figure)",
                ", ".join(f"{k} {_fmt(*gains[k])}" for k in iso),
                "reproduced" if len(near) == len(iso) else ("partly" if near else "not reproduced"),
                "reproduced if every isotropic dynamics ends within 0.01 + 2 combined std of GD's test accuracy",
            )
        )
    sharp = {k: _ms(r[k], "sharpness_signed") for k in ("gd", *_ALIGNED) if k in r}
    if "gd" in sharp and len(sharp) > 1 and sharp["gd"][0] == sharp["gd"][0]:
        flatter = [k for k in sharp if k != "gd" and sharp[k][0] < sharp["gd"][0]]
        n_al = len(sharp) - 1
        out.append(
            Claim(
                "fashion",
                "Fig. 2 right: the aligned dynamics reach flatter minima (lower expected sharpness E[L(θ+ν)] − L(θ), σ = 0.01) than GD",
                "sharpness decreases after the switch (figure)",
                ", ".join(f"{k} {_fmt(*sharp[k])}" for k in sharp),
                "reproduced"
                if len(flatter) == n_al
                else ("partly" if flatter else "not reproduced"),
                "reproduced if every aligned dynamics ends with lower mean signed sharpness than GD; partly if some do",
            )
        )

    def last(values: Any) -> float | None:
        vals = [v for v in (values or []) if isinstance(v, int | float)]
        return float(vals[-1]) if vals else None

    gd_ratio, _ = _ms(gd_phase, "indicator_ratio")
    sgd_curve = r.get("sgd", {}).get("curves", {}).get("indicator_ratio", {})
    sgd_ratio = last(sgd_curve.get("mean"))
    measured = [v for v in (gd_ratio, sgd_ratio) if v is not None and v == v]
    if measured:
        low = min(measured)
        out.append(
            Claim(
                "fashion",
                "Fig. 4 right: on the FashionMNIST CNN, Tr(HΣ) of SGD's noise far exceeds Tr(HΣ̄) along training",
                "Tr(HΣ) well above Tr(HΣ̄) (figure; values not stated)",
                f"Tr(HΣ)/Tr(HΣ̄) at θ*_GD {_fmt(gd_ratio, None)}"
                + (f", at the end of SGD {_fmt(sgd_ratio, None)}" if sgd_ratio is not None else ""),
                "reproduced" if low > 10 else ("partly" if low > 1 else "not reproduced"),
                "reproduced if every measured ratio exceeds 10, partly if every one exceeds 1",
            )
        )
    return out


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


def claims(out: str | Path) -> list[Claim]:
    """All claims with verdicts, from the saved results under ``out`` (missing parts: not run)."""
    out = Path(out)
    rows: list[Claim] = []
    for name, fn in _CLAIMS.items():
        r = _load(out, name)
        if r is None:
            rows.append(Claim(name, _TITLES[name], "", "", "not run", "results.json missing"))
            continue
        try:
            got = fn(r)
        except (KeyError, TypeError, ValueError) as exc:
            got = [Claim(name, _TITLES[name], "", f"could not read results: {exc}", "not run", "")]
        rows.extend(got or [Claim(name, _TITLES[name], "", "no comparable numbers", "not run", "")])
    return rows


def _settings(out: Path, name: str) -> str:
    path = out / name / "config.json"
    if not path.exists():
        return ""
    cfg = json.loads(path.read_text())
    cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else cfg
    items = [f"`{k}` = {json.dumps(v)}" for k, v in cfg.items()] if isinstance(cfg, dict) else []
    return ", ".join(items)


def _figures(out: Path, name: str) -> list[Path]:
    return sorted((out / name).glob("*.png"))


def write_report(out: str | Path, *, profile: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out``."""
    out = Path(out)
    rows = claims(out)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    counts = {
        v: sum(r.verdict == v for r in rows)
        for v in ("reproduced", "partly", "not reproduced", "not run")
    }
    md = [
        "# Reproduction report — The Anisotropic Noise in SGD (Zhu et al., ICML 2019)",
        "",
        f"Profile: **{profile or next((t.get('profile') for t in timings.values()), '?')}**. "
        + ", ".join(f"{v}: {n}" for v, n in counts.items()),
        "",
        "Verdicts are computed from the numbers by the rule in each row (see `sgdnoise/report.py`), "
        "never written by hand. Paper numbers come from the poster and PAPER_NOTES §00/§4; where the "
        "paper states no number, the row says so.",
        "",
        "| experiment | claim | paper | ours | verdict | rule |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.experiment, r.claim, r.paper, r.ours, f"**{r.verdict}**", r.rule]
        md.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    for name, title in _TITLES.items():
        md += ["", f"## {title}", ""]
        if not (out / name / "results.json").exists():
            md.append("_Not run in this output folder._")
            continue
        t = timings.get(name, {})
        if t:
            md.append(
                f"Run time: {t['seconds']:.1f} s on {t.get('device', '?')} (profile {t.get('profile', '?')})."
            )
            md.append("")
        summary = out / name / "summary.md"
        if summary.exists():
            text = summary.read_text().strip()
            text = re.sub(r"^#+ .*\n", "", text, count=1)  # drop its own title
            md += [text, ""]
        for fig in _figures(out, name):
            md.append(f"![{fig.stem}]({name}/{fig.name})")
        settings = _settings(out, name)
        if settings:
            md += ["", f"<details><summary>Settings</summary>\n\n{settings}\n\n</details>"]
    text = "\n".join(md) + "\n"
    md_path = out / "report.md"
    atomic_write_text(md_path, text)
    html_path = out / "report.html"
    atomic_write_text(html_path, _to_html(text, out))
    return md_path, html_path


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    s = re.sub(r"_(.+?)_(?=\W|$)", r"<i>\1</i>", s)
    return s


def _to_html(md: str, out: Path) -> str:
    """A small Markdown subset → HTML, with every PNG embedded as base64 (self-contained)."""
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
            head, data = cells[0], cells[2:]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            for row in data:
                cls = ""
                verdict = row[4] if len(row) > 4 else ""
                for v in ("not reproduced", "reproduced", "partly", "not run"):
                    if v in verdict:
                        cls = v.replace(" ", "-")
                        break
                body.append(
                    f'<tr class="{cls}">'
                    + "".join(f"<td>{_inline(c.replace(chr(92) + '|', '|'))}</td>" for c in row)
                    + "</tr>"
                )
            body.append("</table>")
            continue
        m = re.match(r"!\[(.*?)\]\((.+?)\)", line)
        if m:
            path = out / m.group(2)
            if path.exists():
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(
                    f'<figure><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"/></figure>'
                )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif (
            line.startswith("<details>")
            or line.startswith("</details>")
            or line.startswith("<summary>")
        ):
            body.append(line)
        elif line.startswith("- ") or line.startswith("* "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}"
        "tr.reproduced td:nth-child(5){background:#d9f2d9}tr.partly td:nth-child(5){background:#fff2cc}"
        "tr.not-reproduced td:nth-child(5){background:#f8d0d0}tr.not-run td:nth-child(5){background:#eee}"
        "img{max-width:100%}code{background:#f4f4f4;padding:0 2px}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sgdnoise reproduction report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
