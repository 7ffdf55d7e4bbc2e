"""The batched engine against the per-dynamics loop, in one run (ratio batched/loop).

Every dynamics of the FashionMNIST experiment (× ``--seeds`` seeds) on the paper's CNN (11,330
parameters) and N random images (the cost does not depend on the pixel values): first each member
alone with :func:`sgdnoise.make_optimizer` (the loop), then all members together with
:class:`sgdnoise.engine.BatchedEngine`, on the same device, in the same process, for the same
number of steps (a whole number of refresh periods). Writes

    {"loop_s", "batched_s", "ratio": batched_s / loop_s, "member_lanczos_s",
     "lockstep_over_member_lanczos", "max_rel_diff", "plan", ...}

(``member_lanczos_s``: the engine with ``lockstep_lanczos=False``, the Hessian members' Lanczos
refreshes run member by member instead of in lock-step with their products batched.)

``max_rel_diff`` is the largest relative difference of a member's final θ from the loop's (the
equivalence the tests check in float64; here in the run's dtype). ``sgdnoise.engine.resolve_engine``
picks the loop where the ratio is above 1 (the CPU).

Usage::

    python bench/bench_engine.py [--out bench/out/engine.json] [--device cpu] [--seeds 1]
        [--n 256] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sgdnoise
from sgdnoise.engine import BatchedEngine, Member
from sgdnoise.models import FashionCNN
from sgdnoise.noise.dynamics import dynamics_names
from sgdnoise.runs import env_info, resolve_device

EIGEN = {"max_matvecs": 15, "on_nonconvergence": "ignore"}
OPTIONS = {
    "gld_leading": {"k": 5},
    "gld_hessian": {"k": 5, **EIGEN},
    "gld_hessian_top1": EIGEN,
}


def _problem(n: int, device: torch.device, dtype: torch.dtype) -> sgdnoise.Problem:
    gen = torch.Generator().manual_seed(0)
    model = FashionCNN(generator=gen, dtype=dtype).to(device)
    x = torch.rand(n, 1, 28, 28, generator=gen).to(device, dtype)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    return sgdnoise.Problem(model, F.cross_entropy, x, y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "engine.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--k", type=int, default=5, help="eigenpairs of the hessian structure")
    args = parser.parse_args()
    device = resolve_device(args.device)
    problem = _problem(args.n, device, torch.float32)
    theta0 = problem.theta()
    OPTIONS["gld_hessian"] = {**OPTIONS["gld_hessian"], "k": args.k}
    members = [
        Member(
            name,
            0.05,
            seed=1000 * s + j,
            batch_size=32,
            refresh_every=3,
            options=OPTIONS.get(name, {}),
        )
        for s in range(args.seeds)
        for j, name in enumerate(dynamics_names())
    ]
    problem.hvp(torch.zeros(problem.dim, 1, device=device))  # one-time route checks, outside timing
    problem.per_sample_gradients(torch.arange(2))
    _sync(device)
    start = time.perf_counter()
    alone = []
    for m in members:
        problem.set_theta(theta0)
        kw = {} if m.dynamics == "gd" else {"batch_size": m.batch_size}
        if m.structure is not None:
            kw["refresh_every"] = m.refresh_every
        opt = sgdnoise.make_optimizer(m.dynamics, problem, m.lr, seed=m.seed, **kw, **m.options)
        for _ in range(args.steps):
            opt.step()
        alone.append(problem.theta())
    _sync(device)
    loop_s = time.perf_counter() - start
    timings = {}
    for lockstep in (False, True):
        start = time.perf_counter()
        engine = BatchedEngine(problem, members, theta0, lockstep_lanczos=lockstep)
        for _ in range(args.steps):
            engine.step()
        _sync(device)
        timings[lockstep] = time.perf_counter() - start
    batched_s = timings[True]
    diffs = [float((engine.theta[j] - a).norm() / a.norm()) for j, a in enumerate(alone)]
    result = {
        "members": len(members),
        "seeds": args.seeds,
        "n_train": args.n,
        "steps": args.steps,
        "dtype": "float32",
        "loop_s": loop_s,
        "batched_s": batched_s,
        "ratio": batched_s / loop_s,
        # the Hessian members' Lanczos refreshes in lock-step (products batched across members)
        # against member by member, both in the batched engine
        "member_lanczos_s": timings[False],
        "lockstep_over_member_lanczos": batched_s / timings[False],
        "max_rel_diff": max(diffs),
        "plan": engine.plan.describe(),
        "env": env_info(device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
