"""The report (issue 14, items 7 and 12): escaping, embedded files, smoke wording, verdicts that
say what they rest on, estimates that cannot support a ratio, honest toy comparisons."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sgdnoise.report import claims, write_report

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _toy_results(**rates: tuple[float, float]) -> dict:
    """Toy results: dynamics → (success rate, Tr(HΣ)) with 100 runs."""
    from sgdnoise.runs import wilson_interval

    out = {}
    for name, (rate, tr) in rates.items():
        k = round(rate * 100)
        lo, hi = wilson_interval(k, 100)
        out[name] = {"label": name, "success_rate": k / 100, "successes": k, "runs": 100,
                     "ci_low": lo, "ci_high": hi, "tr_HS": tr, "tr_HS_std": 0.0}  # fmt: skip
    return out


def _write_part(out: Path, name: str, results: dict, *, preset: str = "quick") -> Path:
    part = out / name
    part.mkdir(parents=True, exist_ok=True)
    (part / "results.json").write_text(json.dumps(results))
    (part / "config.json").write_text(json.dumps({"preset": preset}))
    return part


# ------------------------------------------------------------------------------ item 7


def test_html_escapes_results_text_and_embeds_only_pngs_of_the_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "R"
    part = _write_part(out, "toy", _toy_results(gd=(0.0, 0.0), gld_const=(0.0, 1.1),
                                                 gld_leading=(0.3, 1.8)))  # fmt: skip
    secret = tmp_path / "secret.png"  # outside the output folder
    secret.write_bytes(PNG + b"SECRET")
    (part / "summary.md").write_text(
        "# title\n\n<script>alert('x')</script>\n\n<details><summary>raw</summary>\n\n"
        f"![leak]({secret})\n\n![up](../../secret.png)\n\n| a | <b>b</b> |\n|---|---|\n| 1 | 2 |\n"
    )
    (part / "fig.png").write_bytes(PNG)
    (part / "link.png").symlink_to(secret)  # a link leading out of the folder
    _, html_path = write_report(out)
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<details><summary>raw" not in page and "&lt;details&gt;" in page
    assert "<b>b</b>" not in page and "&lt;b&gt;b&lt;/b&gt;" in page
    assert base64.b64encode(PNG + b"SECRET").decode() not in page
    assert page.count("data:image/png;base64,") == 1  # fig.png only
    assert base64.b64encode(PNG).decode() in page


# ------------------------------------------------------------------------------ item 12


def test_smoke_report_says_it_checks_plumbing_in_its_first_line(tmp_path: Path) -> None:
    out = tmp_path / "R"
    _write_part(out, "toy", _toy_results(gd=(0.0, 0.0), gld_const=(0.0, 1.1), gld_diag=(0, 1.1),
                                          gld_leading=(0.0, 1.8)), preset="smoke")  # fmt: skip
    md_path, html_path = write_report(out, profile="smoke")
    md = md_path.read_text()
    first = md.splitlines()[0]
    assert first.startswith("# Reproduction report") and "plumbing, not the claims" in first
    assert "**not reproduced**" not in md and "**not tested (smoke)**" in md
    assert "plumbing, not the claims" in html_path.read_text().split("<h1>", 1)[1][:200]
    # The same numbers from the quick profile do get a verdict.
    _write_part(out, "toy", json.loads((out / "toy" / "results.json").read_text()))
    assert "**not reproduced**" in write_report(out)[0].read_text()


def _fashion(seeds: int, *, tr_iso: float, tr_iso_se: float = 0.0) -> dict:
    def stat(m: float, s: float | None) -> dict:
        return {"mean": m, "std": s if seeds > 1 else None, "n": seeds}

    curves = {
        "tr_HS": {"iteration": [3000], "mean": [50.0], "std": [None], "stderr": [1.0]},
        "tr_HS_iso": {"iteration": [3000], "mean": [tr_iso], "std": [None], "stderr": [tr_iso_se]},
    }
    res = {
        "meta": {"experiment": "fashion", "profile": "quick", "seeds": list(range(seeds))},
        "gd_phase": {"test_acc": stat(0.66, 0.01), "curves": curves},
    }
    for name, acc in (("gd", 0.66), ("sgd", 0.70), ("gld_const", 0.66)):
        res[name] = {"final_test_acc": stat(acc, 0.002), "sharpness_signed": stat(0.01, 0.001),
                     "curves": {}}  # fmt: skip
    return res


def test_negative_trace_estimate_gives_not_measurable(tmp_path: Path) -> None:
    _write_part(tmp_path, "fashion", _fashion(1, tr_iso=-0.045))
    row = next(c for c in claims(tmp_path) if "Fig. 4 right" in c.claim)
    assert row.verdict == "not measurable"
    assert "negative Hutch++" in row.ours and "-1.1e+03" not in row.ours
    _write_part(tmp_path, "fashion", _fashion(1, tr_iso=0.05, tr_iso_se=0.04))
    row = next(c for c in claims(tmp_path) if "Fig. 4 right" in c.claim)
    assert row.verdict == "not measurable" and "does not exclude 0" in row.ours
    _write_part(tmp_path, "fashion", _fashion(1, tr_iso=0.5, tr_iso_se=0.01))
    row = next(c for c in claims(tmp_path) if "Fig. 4 right" in c.claim)
    assert row.verdict == "reproduced" and "100" in row.ours


@pytest.mark.parametrize(("seeds", "basis"), [(1, "1 seed — indicative"), (3, "3 seeds")])
def test_each_verdict_says_how_many_seeds_it_rests_on(
    tmp_path: Path, seeds: int, basis: str
) -> None:
    _write_part(tmp_path, "fashion", _fashion(seeds, tr_iso=0.5))
    rows = [c for c in claims(tmp_path) if c.experiment == "fashion"]
    assert rows and all(c.basis.startswith(basis) for c in rows)
    md = write_report(tmp_path)[0].read_text()
    assert "| based on |" in md and basis in md
    if seeds == 1:  # a missing spread is not a measured zero
        assert any("one seed: no spread" in c.rule for c in rows)


def test_toy_ordering_claim_includes_full_sigma_and_names_what_is_out_of_order(
    tmp_path: Path,
) -> None:
    res = _toy_results(gd=(0.0, 0.0), gld_const=(0.01, 1.10), gld_diag=(0.0, 1.10),
                       gld_leading=(0.33, 1.84), gld_hessian=(0.28, 1.84),
                       gld_hessian_top1=(0.40, 2.00), gld_full=(0.43, 1.83))  # fmt: skip
    _write_part(tmp_path, "toy", res)
    first, order = [c for c in claims(tmp_path) if c.experiment == "toy"]
    assert "full Σ" in first.claim and "full Σ" in first.ours
    assert "full Σ" in order.claim and "full Σ Tr(HΣ) 1.83 → 43%" in order.ours
    assert "out of order: " in order.ours and "1st eigvec" in order.ours.split("out of order")[1]
    assert "/15 pairs" in order.ours  # 6 noisy dynamics, every pair counted


def test_nothing_cites_files_users_do_not_have(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "PAPER_NOTES" not in text and "../shared" not in text, path
    _write_part(tmp_path, "toy", _toy_results(gd=(0.0, 0.0), gld_const=(0.0, 1.1),
                                               gld_leading=(0.3, 1.8)))  # fmt: skip
    md, page = write_report(tmp_path)
    for text in (md.read_text(), page.read_text()):
        assert "PAPER_NOTES" not in text and "shared/" not in text


def test_fashion_summary_gives_no_ratio_from_a_negative_trace_estimate() -> None:
    from sgdnoise.figures.fashion import _ratio_text

    bad = {"tr_HS": {"values": [50.0]}, "tr_HS_iso": {"values": [-0.045]},
           "indicator_ratio": {"mean": -1104.0, "std": None}}  # fmt: skip
    assert "not measurable" in _ratio_text(bad) and "1104" not in _ratio_text(bad)
    good = {"tr_HS": {"values": [50.0]}, "tr_HS_iso": {"values": [0.5]},
            "indicator_ratio": {"mean": 100.0, "std": None}}  # fmt: skip
    assert _ratio_text(good) == "ratio 100.0"
