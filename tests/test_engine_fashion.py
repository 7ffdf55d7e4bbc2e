"""``sgdnoise fashion --engine batched``: the same numbers and files as the loop, resumable.

Tolerance: float64, smoke sizes — every number of ``results.json`` (curves included) within 1e-8
relative of the loop's (measured: ≤ 2e-11; the members' trajectories differ from the loop's only
by the rounding of the batched reductions), every non-float value (counts, flags, steps) equal.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import make_problem
from sgdnoise.engine import BatchedEngine, Member
from sgdnoise.experiments import fashion
from sgdnoise.experiments.fashion import config_from, run
from sgdnoise.experiments.fashion_run import load_final
from sgdnoise.phases import StagePhase, build_optimizer, run_phase, run_stage
from sgdnoise.sharpness import expected_sharpness, expected_sharpness_members
from test_fashion import HAVE_DATA, needs_data

RTOL = 1e-8
#: a smaller smoke run: 6 + 10 iterations, 100 test images, the cheapest indicator (checkpoints
#: every 5 steps).
SMALL = {"dtype": "float64", "n_test": 100, "gd_iterations": 6, "indicator_samples": 2,
         "indicator_trace_matvecs": 4}  # fmt: skip


def _compare(a: Any, b: Any, path: str = "") -> list[tuple[float, str]]:
    """Relative differences of every float; asserts every other value equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        out = []
        for k in a:
            if k not in ("wall_s", "seconds_per_step", "engine"):
                out += _compare(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list):
        assert len(a) == len(b), path
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _compare(x, y, f"{path}[{i}]")]  # fmt: skip
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        return [(abs(a - b) / max(abs(a), abs(b), 1e-300), path)]
    assert a == b or (a != a and b != b), (path, a, b)
    return []


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    if not HAVE_DATA:
        pytest.skip("FashionMNIST not installed")
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("loop", "batched"):
        cfg = config_from("smoke", **SMALL, engine=engine)
        out[engine] = (root / engine, run(cfg, root / engine, device="cpu", progress=False))
    return out


@needs_data
def test_batched_results_equal_the_loop(both_runs):
    """Every dynamics: results.json numbers within 1e-8 relative, the engine recorded."""
    (_, loop), (_, batched) = both_runs["loop"], both_runs["batched"]
    assert loop["meta"]["engine"] == "loop" and batched["meta"]["engine"] == "batched"
    diffs = _compare(loop, batched)
    assert len(diffs) > 500  # every curve of every dynamics was compared
    worst = max(diffs)
    assert worst[0] < RTOL, worst
    for dyn in fashion.ALL_DYNAMICS:  # the dynamics moved: the comparison is not of constants
        assert (
            batched[dyn]["curves"]["test_loss"]["mean"][-1]
            != batched["gd_phase"]["test_loss"]["mean"]
        )


@needs_data
def test_batched_writes_the_loops_files(both_runs):
    (loop_dir, _), (batched_dir, _) = both_runs["loop"], both_runs["batched"]
    files = {p.relative_to(loop_dir) for p in loop_dir.rglob("*") if "seed_" in str(p)}
    assert files == {
        p.relative_to(batched_dir) for p in batched_dir.rglob("*") if "seed_" in str(p)
    }
    assert not any(p.name == "checkpoint.pt" for p in files)
    for phase in ("gd_phase", *fashion.ALL_DYNAMICS):
        a = load_final(loop_dir / "seed_0" / phase)
        b = load_final(batched_dir / "seed_0" / phase)
        assert [sorted(r) for r in a["rows"]] == [sorted(r) for r in b["rows"]], phase
        assert torch.allclose(a["theta"], b["theta"], rtol=1e-9, atol=1e-12), phase
        assert math.isfinite(b["wall_s"]) and b["wall_s"] > 0


@needs_data
def test_batched_interrupted_everywhere_equals_uninterrupted(tmp_path):
    """Two seeds: stopped 7 steps into each stage (past the checkpoint at 5) and resumed until
    done, the batched run gives bit-identical rows and θ (generators, warm starts restored)."""
    cfg = config_from("smoke", **{**SMALL, "gd_iterations": 8}, engine="batched", seeds=(0, 1),
                      dynamics=("sgd", "gld_hessian_top1", "gld_multiplicative"),
                      indicator_dynamics=())  # fmt: skip
    whole = run(cfg, tmp_path / "whole", device="cpu", progress=False)
    calls = 0
    while not (res := run(cfg, tmp_path / "resumed", device="cpu", progress=False, _stop_after=7)):
        calls += 1
        assert calls < 10
    assert calls == 2  # each stage was interrupted once, at step 7, and resumed from step 5
    assert _compare(whole, res) and max(_compare(whole, res))[0] == 0.0
    for seed in (0, 1):
        for phase in ("gd_phase", *cfg.dynamics):
            a = load_final(tmp_path / "whole" / f"seed_{seed}" / phase)
            b = load_final(tmp_path / "resumed" / f"seed_{seed}" / phase)
            assert a["rows"] == b["rows"], (seed, phase)
            assert torch.equal(a["theta"], b["theta"]), (seed, phase)


def test_engine_choice_is_said_and_torchrun_refused(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert fashion._engine(config_from("smoke"), cpu) == "loop"
    assert "loop engine (engine='auto'" in capsys.readouterr().err
    assert fashion._engine(config_from("smoke", engine="batched"), cpu) == "batched"
    monkeypatch.setattr(fashion, "local_range", lambda n: (0, n // 2))  # a rank of two
    monkeypatch.setattr(fashion, "resolve_engine", lambda e, d: "batched")  # as on CUDA
    assert fashion._engine(config_from("smoke"), cpu) == "loop"
    with pytest.raises(ValueError, match="does not run sharded under torchrun"):
        fashion._engine(config_from("smoke", engine="batched"), cpu)
    with pytest.raises(ValueError, match="engine"):
        config_from("smoke", engine="fast")


def test_sharpness_members_equal_one_at_a_time():
    problem = make_problem("cnn", n=24)
    thetas = problem.theta() + 0.1 * torch.randn(3, problem.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # fmt: skip
    engine = BatchedEngine(problem, [Member("gd", 0.1)] * 3, thetas)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    found = expected_sharpness_members(engine.losses, thetas, 0.05, 20, gens, draws_per_batch=7)
    for j, es in enumerate(found):
        problem.set_theta(thetas[j])
        ref = expected_sharpness(problem, 0.05, 20, seed=5 + j, draws_per_batch=7)
        for key in ("signed", "absolute", "signed_stderr", "absolute_stderr", "loss"):
            assert getattr(es, key) == pytest.approx(getattr(ref, key), rel=1e-11), key
        assert es.num_samples == 20
    with pytest.raises(ValueError, match="one generator per row"):
        expected_sharpness_members(engine.losses, thetas, 0.05, 20, gens[:2])
    with pytest.raises(ValueError, match="16-bit|float32/float64"):
        expected_sharpness_members(engine.losses, thetas.half(), 0.05, 20, gens)
    with pytest.raises(ValueError, match=r"shape \[K,"):
        engine.losses(thetas[0])


def _phase(folder, member, theta0, steps=12):
    return StagePhase(folder, member, theta0, steps, checkpoint_every=6)


def test_loop_resumes_a_batched_checkpoint(tmp_path):
    """run_stage's checkpoints hold each member's optimizer state_dict: run_phase (the loop)
    resumes them and ends where the batched stage ends (1e-10 relative, float64)."""
    problem = make_problem("mlp", n=24)
    theta0 = problem.theta()
    opts = {"k": 2, "max_matvecs": 6, "on_nonconvergence": "ignore"}
    members = [
        Member("sgd", 0.05, generator=torch.Generator().manual_seed(1), batch_size=4),
        Member("gld_hessian", 0.05, generator=torch.Generator().manual_seed(2), batch_size=4,
               refresh_every=3, options=opts),
    ]  # fmt: skip

    def measure(engine, idx, t):
        return [{"t": t, "loss": float(engine.last_loss[j])} if t % 4 == 0 else None for j in idx]

    phases = [_phase(tmp_path / f"p{j}", m, theta0) for j, m in enumerate(members)]
    stopped = run_stage(problem, phases, measure, stop_after=8)
    assert all(r["unfinished"] for r in stopped)
    assert all((p.folder / "checkpoint.pt").exists() for p in phases)
    fresh = [Member(m.dynamics, m.lr, generator=torch.Generator().manual_seed(j + 1),
                    batch_size=4, refresh_every=m.refresh_every, options=m.options)
             for j, m in enumerate(members)]  # fmt: skip
    whole = run_stage(problem, [_phase(tmp_path / f"w{j}", m, theta0) for j, m in enumerate(fresh)],
                      measure)  # fmt: skip
    for j, m in enumerate(members):
        alone = build_optimizer(problem, m)  # only to check the checkpoint's format
        ck = torch.load(phases[j].folder / "checkpoint.pt", weights_only=True)
        assert ck["t"] == 6 and set(ck["optim"]) == set(alone.state_dict())
        again = Member(m.dynamics, m.lr, generator=torch.Generator().manual_seed(99),
                       batch_size=4, refresh_every=m.refresh_every, options=m.options)  # fmt: skip
        res = run_phase(problem, _phase(phases[j].folder, again, theta0), lambda p, t: None)
        rel = float((res["theta"] - whole[j]["theta"]).norm() / whole[j]["theta"].norm())
        assert rel < 1e-10, (m.dynamics, rel)
