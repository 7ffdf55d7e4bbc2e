"""One process × T threads against R processes × T/R threads (gloo), in one run (issue 13).

For each model — the paper's FashionMNIST CNN (D = 11,330) and a wider MLP on the same images —
and N random images (the cost does not depend on the pixel values; default N = 300 for both,
because the exact Tr(HΣ) costs N² sample passes: ``--num-samples 1200 --mlp-num-samples 600``,
the paper's N for the CNN, takes about 15 minutes on the 2-core CPU), times

* the full-batch gradient ∇L,
* a block of 20 Hessian-vector products (one call, ``H @ V`` with V ``[D, 20]``),
* the exact escape indicator Tr(HΣ_b) (N Hessian-vector products of centred per-sample gradients),

first in this process with ``--threads`` threads on all N samples, then under R gloo ranks with
``threads / R`` threads each, every rank holding N/R samples (`sgdnoise.local_range`). Writes JSON::

    {"models": {name: {"dim", "n", quantity: {"one_process_s", "distributed_s",
        "parallel_efficiency", "bytes_per_product", "max_rel_diff"}}}, "ranks", "threads", "env"}

``parallel_efficiency`` = one_process_s / distributed_s at the same number of cores (1.0: as fast;
the issue's target is ≥ 0.8). ``bytes_per_product`` is what one rank all-reduced, divided by the
number of Hessian products (or 1 for the gradient). ``max_rel_diff`` compares the distributed
result with the one-process one (floating-point reduction order only).

Usage::

    python bench/bench_distributed.py [--out bench/out/distributed.json] [--num-samples 300]
        [--mlp-num-samples N] [--ranks 2] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import sgdnoise
from sgdnoise.models import FashionCNN
from sgdnoise.runs import env_info

MODELS = ("fashion_cnn", "mlp_784_512_512_10")


def _model(name: str) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    if name == "fashion_cnn":
        return FashionCNN(generator=gen)
    torch.manual_seed(0)  # the MLP's own initialisation; only the timings matter
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _measure(name: str, n: int, repeats: int) -> dict[str, Any]:
    """Time the three quantities on this process's problem (sharded when a group is up)."""
    x, y = _data(n)
    lo, hi = sgdnoise.local_range(n)
    problem = sgdnoise.Problem(
        _model(name), F.cross_entropy, x[lo:hi], y[lo:hi], memory_budget="2G"
    )
    V = torch.randn(problem.dim, 20, generator=torch.Generator().manual_seed(2))
    H = sgdnoise.hessian(problem)
    H @ V[:, :1]  # the one-time route check, outside the timings
    shard = problem.shard

    def timed(fn: Any, products: int) -> dict[str, Any]:
        best, value = float("inf"), None
        sent = shard.bytes_communicated if shard is not None else 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - t0)
        sent = (shard.bytes_communicated - sent) / repeats if shard is not None else 0
        return {"seconds": best, "value": value, "bytes_per_product": sent / max(1, products)}

    out = {
        "dim": problem.dim,
        "n": n,
        "gradient": timed(lambda: problem.gradient(), 1),
        "hvp_block_20": timed(lambda: H @ V, 20),
        "exact_tr_HS": timed(lambda: torch.tensor(sgdnoise.escape_indicator(problem, 32).tr_HS), n),
    }
    return out


def _n(args: argparse.Namespace, name: str) -> int:
    """N of this model: ``--mlp-num-samples`` for the MLP when given, else ``--num-samples``."""
    if name == MODELS[1] and args.mlp_num_samples is not None:
        return int(args.mlp_num_samples)
    return int(args.num_samples)


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads // args.ranks))
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    try:
        result = {name: _measure(name, _n(args, name), args.repeats) for name in MODELS}
        if dist.get_rank() == 0:
            torch.save(result, args.result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/distributed.json")
    parser.add_argument("--num-samples", type=int, default=300, help="N (the CNN; both models "
                        "unless --mlp-num-samples)")  # fmt: skip
    parser.add_argument("--mlp-num-samples", type=int, default=None, help="N of the MLP")
    parser.add_argument(
        "--device", default="cpu", help="cpu (gloo); the NCCL path is not benchmarked yet"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return 0
    if args.device != "cpu":
        print(
            f"bench_distributed: gloo on the CPU only (asked for {args.device!r}); running on cpu"
        )
    torch.set_num_threads(args.threads)
    one = {name: _measure(name, _n(args, name), args.repeats) for name in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rank0.pt"
        env = dict(
            os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(args.threads // args.ranks)
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.ranks}", __file__, "--worker", "--result", str(result),
               "--num-samples", str(args.num_samples), "--mlp-num-samples", str(_n(args, MODELS[1])),
               "--ranks", str(args.ranks), "--threads", str(args.threads),
               "--repeats", str(args.repeats)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, timeout=3600)
        dist = torch.load(result)
    report: dict[str, Any] = {}
    for name in MODELS:
        row: dict[str, Any] = {"dim": one[name]["dim"], "n": _n(args, name)}
        for q in ("gradient", "hvp_block_20", "exact_tr_HS"):
            a, b = one[name][q], dist[name][q]
            diff = float(
                (a["value"] - b["value"]).abs().max() / a["value"].abs().max().clamp_min(1e-30)
            )
            row[q] = {
                "one_process_s": a["seconds"],
                "distributed_s": b["seconds"],
                "parallel_efficiency": a["seconds"] / b["seconds"],
                "bytes_per_product": b["bytes_per_product"],
                "max_rel_diff": diff,
            }
        report[name] = row
    out = {"models": report, "ranks": args.ranks, "threads": args.threads, "env": env_info("cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, row in report.items():
        for q in ("gradient", "hvp_block_20", "exact_tr_HS"):
            r = row[q]
            print(f"{name:20s} {q:13s} 1×{args.threads}: {r['one_process_s']:.3f} s  "
                  f"{args.ranks}×{args.threads // args.ranks}: {r['distributed_s']:.3f} s  "
                  f"efficiency {r['parallel_efficiency']:.2f}  "
                  f"{r['bytes_per_product']:.0f} B/product  diff {r['max_rel_diff']:.1e}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
