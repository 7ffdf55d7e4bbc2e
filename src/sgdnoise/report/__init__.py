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
import json
import re
from pathlib import Path
from typing import Any

from .._utils import atomic_write_text
from ._base import VERDICTS, Claim

__all__ = ["Claim", "claims", "write_report"]


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name / "results.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _experiments() -> dict[str, Any]:
    from ..experiments import EXPERIMENTS

    return EXPERIMENTS


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
    for name, exp in _experiments().items():
        rows.extend(_part_claims(out, name, exp, profile))
    return rows


def _part_claims(out: Path, name: str, exp: Any, profile: str | None) -> list[Claim]:
    """One experiment's rows: its claims, or why there are none; smoke parts are not tested."""
    r = _load(out, name)
    if r is None:
        why = (
            "results.json damaged"
            if (out / name / "results.json").exists()
            else "results.json missing"
        )
        return [Claim(name, exp.title, "", "", "not run", why)]
    try:
        got = exp.claims_of(r)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        got = [Claim(name, exp.title, "", f"could not read results: {exc}", "not run", "")]
    got = got or [Claim(name, exp.title, "", "no comparable numbers", "not run", "")]
    if (_part_profile(out, name) or profile) == "smoke":
        got = [
            dataclasses.replace(
                c,
                verdict="not tested (smoke)" if c.verdict != "not run" else c.verdict,
                basis="smoke sizes: " + c.basis if c.basis else "smoke sizes",
            )
            for c in got
        ]
    return got


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


def _profile_of(out: Path, timings: dict[str, Any]) -> str | None:
    """The profile of the parts in ``out`` (``"mixed"`` when they differ, ``None`` if unknown)."""
    found = {t.get("profile") for t in timings.values() if isinstance(t, dict)}
    found |= {_part_profile(out, n) for n in _experiments()}
    found.discard(None)
    return found.pop() if len(found) == 1 else ("mixed" if found else None)


def _head(rows: list[Claim], profile: str | None, smoke: bool) -> list[tuple[str, Any]]:
    """The title, the verdict counts, the note on verdicts and the claims table."""
    counts = {v: sum(r.verdict == v for r in rows) for v in VERDICTS}
    title = "# Reproduction report — The Anisotropic Noise in SGD (Zhu et al., ICML 2019)"
    if smoke:
        title = (
            "# Reproduction report (smoke profile: checks the plumbing, not the claims) — "
            "The Anisotropic Noise in SGD (Zhu et al., ICML 2019)"
        )
    blocks = [("md", title)] + ([("md", _SMOKE_LINE)] if smoke else [])
    blocks.append(("md", f"Profile: **{profile or '?'}**. "
                   + ", ".join(f"{v}: {n}" for v, n in counts.items() if n or v in VERDICTS[:3])))  # fmt: skip
    blocks.append((
        "md",
        "Verdicts are computed from the numbers by the rule in each row (see `sgdnoise/report/`), "
        "never written by hand; the column 'based on' says how many seeds or runs each rests on "
        "(one seed is only indicative). Paper numbers come from the poster and the paper (Zhu et "
        "al., ICML 2019); where the paper states no number, the row says so.",
    ))  # fmt: skip
    table = [
        "| experiment | claim | paper | ours | verdict | based on | rule |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.experiment, r.claim, r.paper, r.ours, f"**{r.verdict}**", r.basis, r.rule]
        table.append(
            "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )
    blocks.append(("md", "\n".join(table)))
    return blocks


def _section(out: Path, name: str, title: str, timing: Any) -> list[tuple[str, Any]]:
    """One experiment's section: run time, its summary, its figures and its settings."""
    blocks: list[tuple[str, Any]] = [("md", f"## {title}")]
    if not (out / name / "results.json").exists():
        return [*blocks, ("md", "_Not run in this output folder._")]
    if isinstance(timing, dict) and isinstance(timing.get("seconds"), int | float):
        blocks.append(("md", f"Run time: {timing['seconds']:.1f} s on {timing.get('device', '?')} "
                       f"(profile {timing.get('profile', '?')})."))  # fmt: skip
    try:
        text = (out / name / "summary.md").read_text(errors="replace").strip()
    except OSError:
        text = ""
    if text:
        blocks.append(("text", re.sub(r"^#+ .*\n", "", text, count=1)))  # drop its own title
    for fig in _figures(out, name):
        blocks.append(("figure", (fig.stem, f"{name}/{fig.name}")))
    settings = _settings(out, name)
    if settings:
        blocks.append(("settings", settings))
    return blocks


def _to_markdown(blocks: list[tuple[str, Any]]) -> str:
    parts = []
    for kind, value in blocks:
        if kind in ("md", "text"):
            parts.append(value)
        elif kind == "figure":
            parts.append(f"![{value[0]}]({value[1]})")
        else:
            parts.append(f"<details><summary>Settings</summary>\n\n{value}\n\n</details>")
    return "\n\n".join(parts) + "\n"


def write_report(out: str | Path, *, profile: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` into ``out``.

    Returns:
        The paths of ``report.md`` and ``report.html``.
    """
    out = Path(out)
    try:
        timings = json.loads((out / "timings.json").read_text())
    except (OSError, ValueError):
        timings = {}
    if not isinstance(timings, dict):
        timings = {}
    if profile is None:
        profile = _profile_of(out, timings)
    rows = claims(out, profile=profile)
    smoke = profile == "smoke" or bool(
        rows and all(r.verdict in ("not tested (smoke)", "not run") for r in rows)
    )
    blocks = _head(rows, profile, smoke)
    for name, exp in _experiments().items():
        blocks += _section(out, name, exp.title, timings.get(name, {}))
    md_path = out / "report.md"
    atomic_write_text(md_path, _to_markdown(blocks))
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
