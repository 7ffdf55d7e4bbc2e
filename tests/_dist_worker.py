"""One gloo rank of tests/test_distributed.py: ``python _dist_worker.py RANK WORLD PORT OUT WHAT``.

Joins a gloo group on the loopback interface (with a timeout, so that a rank whose peer died
exits with an error instead of waiting), runs ``WHAT`` from _dist_scenarios on its shard and, on
rank 0, saves the result to ``OUT``.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import _dist_scenarios as scenarios


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    out, what = sys.argv[4], sys.argv[5]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=float(os.environ.get("SGDNOISE_TEST_TIMEOUT", "60"))),
    )
    try:
        p = scenarios.problem(rank, world)
        if what == "fail" and rank == world - 1:
            raise RuntimeError("rank failed on purpose")
        if what == "stall" and rank == world - 1:
            time.sleep(120)  # alive but silent: the others must time out
        result = getattr(scenarios, "measurements" if what in ("fail", "stall") else what)(p)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # every rank done before any tears its connections down (gloo aborts else)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Done, the group destroyed: leave without the interpreter's teardown, where gloo's worker
    # threads can still be joinable when their C++ destructors run ("terminate called without an
    # active exception": once in about 70 runs here, after the work was done). A
    # failure above raises before this line and exits non-zero as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
