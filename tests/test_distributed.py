"""Sharded problems on 2 and 3 gloo processes (loopback) give the one-process numbers.

Each test starts the ranks as subprocesses (tests/_dist_worker.py) with a wall-clock limit, and
every rank sets a timeout in ``init_process_group``, so no test can hang. Shards have unequal sizes;
every quantity of _dist_scenarios.everything is compared in float64 to 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sgdnoise

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _dist_scenarios as scenarios  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WALL = 150.0  # seconds one launch may take before its ranks are killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    world: int, what: str, out: Path, timeout: float = WALL, wait: int | None = None, **env: str
) -> list[tuple[int | None, str, str]]:
    """Run ``world`` ranks of ``what``; ``(returncode, stdout, stderr)`` of the first ``wait`` ranks
    (default all), every rank killed at ``timeout`` seconds (returncode ``None``)."""
    port = _free_port()
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_dist_worker.py"),
                str(r),
                str(world),
                str(port),
                str(out),
                what,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
            cwd=HERE,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs[: wait or world]:
            try:
                o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                o, e = p.communicate()
                results.append((None, o, e))
                continue
            results.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        return scenarios.everything(scenarios.problem(0, 1))
    finally:
        torch.set_num_threads(before)  # later tests compare against subprocesses at the default


def _compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys()
    worst = 0.0
    for key, r in ref.items():
        g = got[key]
        assert g.shape == r.shape, key
        scale = max(float(r.abs().max()), 1e-300)
        err = float((g - r).abs().max()) / scale
        tol = 1e-5 if key.startswith("f32.") else 1e-10  # float32: its own rounding
        assert err <= tol, f"{key}: relative error {err:.3g}"
        worst = max(worst, err) if tol < 1e-9 else worst
    return worst


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(world, reference, tmp_path):
    out = tmp_path / "rank0.pt"
    runs = _launch(world, "everything", out)
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    worst = _compare(torch.load(out), reference)
    print(f"{world} ranks: {len(reference)} quantities, worst relative error {worst:.2g}")


def test_failing_rank_stops_the_others(tmp_path):
    runs = _launch(2, "fail", tmp_path / "none.pt", timeout=60, SGDNOISE_TEST_TIMEOUT="15")
    assert all(rc not in (0, None) for rc, _, _ in runs)
    assert "rank failed on purpose" in runs[-1][2]
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "imed out")
    assert any(m in runs[0][2] for m in peer_gone), runs[0][2][-2000:]


def test_silent_rank_times_out(tmp_path):
    start = time.monotonic()
    runs = _launch(2, "stall", tmp_path / "none.pt", timeout=40, wait=1, SGDNOISE_TEST_TIMEOUT="5")
    assert runs[0][0] not in (0, None) and time.monotonic() - start < 40
    assert "imed out" in runs[0][2] or "timeout" in runs[0][2].lower(), runs[0][2][-2000:]


def test_ranks_with_different_weights_are_refused(tmp_path):
    runs = _launch(2, "mismatch", tmp_path / "none.pt", timeout=60)
    for rc, _, err in runs:
        assert rc not in (0, None)
        assert "rank 1's parameter values θ differs from rank 0's" in err, err[-2000:]


def test_a_rank_outside_the_group_is_refused(tmp_path):
    runs = _launch(3, "outsider", tmp_path / "none.pt", timeout=60)
    for rc, _, err in runs:
        assert rc == 0, err[-2000:]


def test_shard_offsets_and_take(tmp_path):
    # one process: no group, nothing changes
    p = scenarios.problem(0, 1)
    assert p.shard is None and p.num_samples == scenarios.N
    with pytest.raises(RuntimeError, match="not initialised"):
        sgdnoise.Problem(p.model, p.loss_fn, p.inputs, p.targets, process_group=object())


def _numbers(obj, path=""):
    """Every number of a results.json, by its path (timings left out)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("wall_s", "seconds_per_step", "env", "data_files", "source"):
                yield from _numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, float(obj)


#: torchrun's float32 results against one process: relative, with an absolute floor for numbers
#: that are differences of nearly equal losses (the signed sharpness, Tr H estimates near 0).
TORCHRUN_RTOL, TORCHRUN_ATOL = 1e-3, 1e-5


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its ranks in sessions of their own, so
    killing the launcher's process group would leave them running)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _kill_torchrun_at_checkpoint(cmd: list[str], env: dict[str, str], ckpt: Path) -> None:
    """Start ``cmd`` (torchrun) and SIGKILL the launcher and every rank as soon as ``ckpt``
    exists (a phase is half done); fails if the run ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    alive = proc.poll() is None
    if alive:
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert alive and ckpt.exists(), f"the run ended before its first checkpoint: {err[-2000:]}"


def test_torchrun_fashion_smoke_matches_one_process_and_resumes(tmp_path):
    """`torchrun --nproc-per-node 2 -m sgdnoise fashion`, killed (-9, launcher and ranks) half
    way through a phase and started again, gives the one-process results.json, to TORCHRUN_RTOL
    (float32: the sums run in another order)."""
    import json

    from fake_fashion import write_fashion

    data = tmp_path / "data"
    write_fashion(data)
    flags = ["fashion", "--profile", "smoke", "--device", "cpu", "--no-progress", "--dynamics",
             "gd", "gld_diag", "gld_hessian", "--iterations", "30", "--data-dir", str(data)]  # fmt: skip
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               SGDNOISE_DIST_TIMEOUT="60")  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "sgdnoise", *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "sgdnoise", *flags, "--out", str(tmp_path / "two")]  # fmt: skip
    _kill_torchrun_at_checkpoint(
        cmd, env, tmp_path / "two" / "seed_0" / "gld_hessian" / "checkpoint.pt"
    )
    assert not (tmp_path / "two" / "results.json").exists()
    two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = dict(_numbers(json.loads((tmp_path / "one" / "results.json").read_text())))
    b = dict(_numbers(json.loads((tmp_path / "two" / "results.json").read_text())))
    assert a.keys() == b.keys()
    bad = [
        f"{k}: {a[k]} vs {b[k]}"
        for k in a
        if abs(a[k] - b[k]) > TORCHRUN_ATOL + TORCHRUN_RTOL * abs(a[k]) and a[k] == a[k]
    ]
    assert not bad, bad[:10]
    assert len(a) > 100  # the comparison covered the whole results.json


ONE_PROCESS = [
    ["toy", "--profile", "smoke"],
    ["measure", "--model", "x:y", "--batch-size", "4", "--data", "d.pt"],
    ["reproduce", "--profile", "smoke"],
]


@pytest.mark.parametrize("command", ONE_PROCESS)
def test_one_process_commands_refuse_torchrun(command, tmp_path, capsys):
    """Commands whose every rank would hold the whole data set refuse torchrun in one line."""
    from unittest import mock

    from sgdnoise.cli import main

    with mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "1"}):
        assert main([*command, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs in one process" in err and "rank 1 of 2" in err
    assert not (tmp_path / "out").exists()
