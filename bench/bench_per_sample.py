"""Per-sample gradients on the paper's FashionMNIST CNN: the layer-hook fast path against vmap.

Times, in one run and relative to one full-batch gradient (the baseline measured in the same
run): per-sample gradients of N images by the hook path (``method="auto"``, whose first call on a
problem also verifies the path's assumptions), by ``torch.func.vmap``, and the first, verifying
call. Writes JSON (``--out``). Ratios, not seconds, are what compare across machines.

Usage: ``python bench/bench_per_sample.py [--n 1200] [--repeats 5] [--out bench/out/per_sample.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sgdnoise
from sgdnoise.models import FashionCNN

HERE = Path(__file__).resolve().parent


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200, help="number of images N")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(HERE / "out" / "per_sample.json"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = FashionCNN(generator=torch.Generator().manual_seed(1)).to(args.device)
    x = torch.randn(args.n, 1, 28, 28, generator=gen).to(args.device)
    y = torch.randint(0, 10, (args.n,), generator=gen).to(args.device)

    def fresh() -> sgdnoise.Problem:
        return sgdnoise.Problem(model, F.cross_entropy, x, y)

    problem = fresh()
    problem.gradient()  # warm-up
    first = _time(lambda: fresh().per_sample_gradients(), 1)[0]  # includes the verification
    grad = _time(problem.gradient, args.repeats)
    hooks = _time(lambda: problem.per_sample_gradients(method="auto"), args.repeats)
    vmap = _time(lambda: problem.per_sample_gradients(method="vmap"), max(1, args.repeats // 2))
    base = statistics.median(grad)
    result = {
        "model": "FashionCNN",
        "N": args.n,
        "D": problem.dim,
        "threads": args.threads,
        "device": args.device,
        "route": getattr(problem, "routes", {}).get("per_sample"),
        "seconds": {
            "gradient": base,
            "per_sample_hooks": statistics.median(hooks),
            "per_sample_hooks_first_call_with_verification": first,
            "per_sample_vmap": statistics.median(vmap),
        },
        "ratio_to_gradient": {
            "per_sample_hooks": statistics.median(hooks) / base,
            "per_sample_hooks_first_call_with_verification": first / base,
            "per_sample_vmap": statistics.median(vmap) / base,
        },
        "hooks_speedup_over_vmap": statistics.median(vmap) / statistics.median(hooks),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
