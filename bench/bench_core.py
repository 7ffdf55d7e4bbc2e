"""Core benchmark: sgdnoise's matrix-free estimators against the released code's dense route.

Two problems (Zhu et al., ICML 2019, Sec. 5.2 and 5.3):

* ``onehidden``: Proposition 2's one-hidden-layer network, 512 hidden units (D = 1,536), N = 1,000;
* ``cnn``: the paper's FashionMNIST CNN (D = 11,330) on N = 1,200 random inputs.

Baselines, measured in the same run, each case in its own child process (so that each reports its
own peak resident memory):

* top-20 Hessian eigenpairs: dense Hessian from D single Hessian-vector products (the released
  code's method), then ``eigh``; against :func:`sgdnoise.top_eigenpairs` (Lanczos). On the CNN the
  dense route is timed on ``--dense-columns`` columns and scaled linearly to D (stated in the JSON).
* exact Tr(HΣ): dense H + per-sample gradients by a loop + dense Σ; against
  :func:`sgdnoise.escape_indicator` (N batched Hessian products; Tr(H) by Hutch++).
* per-sample gradients: a Python loop of backward passes; against sgdnoise (hooks and vmap).
* expected sharpness, 1,000 draws (σ = 0.01): the released code's perturb-evaluate-restore loop
  (timed on fewer draws on the CNN and scaled); against :func:`sgdnoise.expected_sharpness`.

Writes JSON (ratios = baseline time / sgdnoise time, with the targets and pass/fail).
Usage: ``python bench/bench_core.py [--out bench/out/core.json] [--device cpu] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import sgdnoise  # noqa: E402
from sgdnoise.data import one_hidden_layer_data  # noqa: E402
from sgdnoise.models import FashionCNN, OneHiddenLayerNet, one_hidden_layer_loss  # noqa: E402


def _rss_mb() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def build(name: str, device: str) -> sgdnoise.Problem:
    gen = torch.Generator().manual_seed(0)
    if name == "onehidden":
        x, y = one_hidden_layer_data(1000, generator=gen)
        model = OneHiddenLayerNet(512, generator=gen, delta=1e-3).to(device)
        # A few Adam steps so that the point is a trained network, as in the paper's measurement.
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(100):
            opt.zero_grad()
            one_hidden_layer_loss(model(x.to(device)), y.to(device)).backward()
            opt.step()
        return sgdnoise.Problem(model, one_hidden_layer_loss, x, y)
    if name == "cnn":
        model = FashionCNN(generator=gen).to(device)
        x = torch.randn(1200, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (1200,), generator=gen)
        return sgdnoise.Problem(model, F.cross_entropy, x, y)
    raise ValueError(name)


def _dense_hessian_by_columns(problem: sgdnoise.Problem, columns: int) -> torch.Tensor:
    """The released code's method: one Hessian-vector product per unit vector."""
    H = sgdnoise.hessian(problem)
    cols = []
    for j in range(columns):
        e = torch.zeros(problem.dim, dtype=problem.dtype, device=problem.device)
        e[j] = 1
        cols.append(H @ e)
    return torch.stack(cols, dim=1)


def _loop_per_sample(problem: sgdnoise.Problem, n: int) -> torch.Tensor:
    params = [p for p in problem.model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        loss = problem.loss_fn(problem.model(problem.inputs[i : i + 1]), problem.targets[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def case(name: str, what: str, device: str, dense_columns: int, loop_samples: int) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    problem = build(name, device)
    D, N = problem.dim, problem.num_samples
    base_rss = _rss_mb()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out: dict = {"problem": name, "case": what, "D": D, "N": N}
    if what == "eig_dense":
        cols = D if dense_columns <= 0 else min(D, dense_columns)
        Hc = _dense_hessian_by_columns(problem, cols)
        if cols == D:
            vals = torch.linalg.eigvalsh(((Hc + Hc.T) / 2).double()).flip(0)[:20]
            out["eigenvalues"] = vals.tolist()
        out["columns_timed"] = cols
    elif what == "eig_lanczos":
        res = sgdnoise.top_eigenpairs(sgdnoise.hessian(problem), 20, generator=0)
        out.update(
            eigenvalues=res.eigenvalues.double().tolist(),
            matvecs=res.num_matvecs,
            max_rel_residual=float(res.residuals.max() / res.eigenvalues.abs().max()),
        )
    elif what == "trhs_dense":
        cols = D if dense_columns <= 0 else min(D, dense_columns)
        Hc = _dense_hessian_by_columns(problem, cols)
        n = N if loop_samples <= 0 else min(N, loop_samples)
        G = _loop_per_sample(problem, n)
        out.update(columns_timed=cols, samples_timed=n)
        if cols == D and n == N:
            C = G - G.mean(0)
            S = C.T @ C / N
            out["tr_HS"] = float(torch.trace(((Hc + Hc.T) / 2) @ S))
    elif what == "trhs_ours":
        ind = sgdnoise.escape_indicator(problem, 1, exact_trace_max_dim=0, generator=0)
        out["tr_HS"] = ind.tr_HS
    elif what == "psg_loop":
        n = N if loop_samples <= 0 else min(N, loop_samples)
        _loop_per_sample(problem, n)
        out["samples_timed"] = n
    elif what in ("psg_hooks", "psg_vmap"):
        try:
            problem.per_sample_gradients(method=what.split("_")[1])
        except ValueError as exc:  # hooks need nn.Linear/nn.Conv2d layers
            out.update(
                seconds=math.nan, skipped=str(exc), peak_rss_mb=_rss_mb(), rss_increase_mb=0.0
            )
            return out
    elif what == "sharp_released":
        # The released flatness.py route: perturb the parameters in place, evaluate the training
        # loss, restore; one draw at a time (timed on loop_samples // 2 draws, scaled).
        draws = 1000 if loop_samples <= 0 else max(10, loop_samples // 2)
        params = [p for p in problem.model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            L0 = problem.loss_fn(problem.model(problem.inputs), problem.targets)
            diffs = []
            for _ in range(draws):
                for p in params:
                    p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p))
                diffs.append(problem.loss_fn(problem.model(problem.inputs), problem.targets) - L0)
                for p, q in zip(params, saved, strict=True):
                    p.copy_(q)
        out["draws_timed"] = draws
    elif what == "sharp_ours":
        es = sgdnoise.expected_sharpness(problem, 0.01, 1000, generator=0)
        out.update(draws_timed=1000, signed=es.signed, signed_stderr=es.signed_stderr)
    else:
        raise ValueError(what)
    sync()
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _rss_mb()
    out["rss_increase_mb"] = out["peak_rss_mb"] - base_rss
    return out


def _run_case(args: tuple) -> dict:
    return case(*args)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE / "out" / "core.json"), help="JSON output path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dense-columns",
        type=int,
        default=200,
        help="CNN only: dense-route columns actually timed (scaled to D)",
    )
    parser.add_argument(
        "--loop-samples",
        type=int,
        default=200,
        help="CNN only: loop per-sample gradients actually timed (scaled to N)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer baseline columns (smoke run)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows: dict[str, dict[str, dict]] = {}
    plan = []
    for name in ("onehidden", "cnn"):
        full = name == "onehidden" and not args.quick
        cols = 0 if full else (50 if args.quick else args.dense_columns)
        loops = 0 if full else (50 if args.quick else args.loop_samples)
        for what in (
            "eig_dense",
            "eig_lanczos",
            "trhs_dense",
            "trhs_ours",
            "psg_loop",
            "psg_hooks",
            "psg_vmap",
            "sharp_released",
            "sharp_ours",
        ):
            if what == "trhs_dense" and cols:
                continue  # extrapolated from the eig_dense columns and the loop timing instead
            plan.append((name, what, args.device, cols, loops))
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for spec in plan:
            r = pool.apply(_run_case, (spec,))
            rows.setdefault(spec[0], {})[spec[1]] = r
            print(
                f"{spec[0]:>9} {spec[1]:<12} {r['seconds']:9.2f} s  peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    summary = {}
    for name, r in rows.items():
        D, N = r["eig_dense"]["D"], r["eig_dense"]["N"]
        scale_cols = D / r["eig_dense"]["columns_timed"]
        dense_eig = r["eig_dense"]["seconds"] * scale_cols
        cols_t = r["eig_dense"]["columns_timed"]
        loop_time = r["psg_loop"]["seconds"] * N / r["psg_loop"]["samples_timed"]
        if "trhs_dense" in r:
            dense_trhs = r["trhs_dense"]["seconds"]
        else:  # dense Tr(HΣ) = D Hessian columns + N loop gradients, each scaled from its timing
            dense_trhs = r["eig_dense"]["seconds"] * scale_cols + loop_time
        s = {
            "D": D,
            "N": N,
            "dense_extrapolated": cols_t < D,
            "dense_columns_timed": r["eig_dense"]["columns_timed"],
            "top20_dense_seconds": dense_eig,
            "top20_lanczos_seconds": r["eig_lanczos"]["seconds"],
            "top20_speedup": dense_eig / r["eig_lanczos"]["seconds"],
            "top20_lanczos_matvecs": r["eig_lanczos"]["matvecs"],
            "trHS_dense_seconds": dense_trhs,
            "trHS_ours_seconds": r["trhs_ours"]["seconds"],
            "trHS_speedup": dense_trhs / r["trhs_ours"]["seconds"],
            "per_sample_loop_seconds": loop_time,
            "per_sample_hooks_seconds": r["psg_hooks"]["seconds"],
            "per_sample_vmap_seconds": r["psg_vmap"]["seconds"],
            "per_sample_speedup_hooks": loop_time / r["psg_hooks"]["seconds"]
            if r["psg_hooks"]["seconds"] == r["psg_hooks"]["seconds"]
            else None,
            "per_sample_speedup_vmap": loop_time / r["psg_vmap"]["seconds"],
            "sharpness_1000_draws_ours_seconds": r["sharp_ours"]["seconds"],
            "sharpness_1000_draws_released_seconds": r["sharp_released"]["seconds"]
            * 1000
            / r["sharp_released"]["draws_timed"],
            "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in r.items()},
            "dense_hessian_mb": D * D * 4 / 2**20,
        }
        if "eigenvalues" in r["eig_dense"]:
            ref = torch.tensor(r["eig_dense"]["eigenvalues"])
            got = torch.tensor(r["eig_lanczos"]["eigenvalues"])
            s["top20_max_rel_error"] = float(((got - ref).abs() / ref.abs().max()).max())
        if "tr_HS" in r.get("trhs_dense", {}):
            s["trHS_rel_error"] = abs(r["trhs_ours"]["tr_HS"] - r["trhs_dense"]["tr_HS"]) / abs(
                r["trhs_dense"]["tr_HS"]
            )
        s["sharpness_speedup"] = (
            s["sharpness_1000_draws_released_seconds"] / s["sharpness_1000_draws_ours_seconds"]
        )
        s["targets"] = {
            "top20_speedup>=50": s["top20_speedup"] >= 50,
            "top20_rel_error<=1e-3": s.get("top20_max_rel_error", 0.0) <= 1e-3,
            "trHS_speedup>=10": s["trHS_speedup"] >= 10,
            "per_sample_speedup>=3": max(
                s["per_sample_speedup_hooks"] or 0.0, s["per_sample_speedup_vmap"]
            )
            >= 3,
        }
        summary[name] = s
    result = {
        "benchmark": "core",
        "device": args.device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "notes": "speedup = baseline seconds / sgdnoise seconds in the same run; on the CNN the dense "
        "route is timed on dense_columns_timed Hessian columns (and the loop on a subset of samples) "
        "and scaled linearly to D (N).",
        "summary": summary,
        "cases": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
