"""The batched engine: a member of a batched run equals the same dynamics run alone.

The equivalence tests take the ``device`` fixture: on a CUDA machine they run on the GPU with the
same float64 tolerance (1e-10 relative over 50 steps); ``test_float32_members_match`` states the
float32 tolerance (1e-4 relative over 20 steps: float32 rounding, ~6e-8 per operation, amplified
by the steps of a non-convex loss).
"""

from __future__ import annotations

import pytest
import torch

import sgdnoise
from conftest import make_problem, on_device
from sgdnoise.engine import BatchedEngine, Member, plan_members
from sgdnoise.linalg import covariance as _cov
from sgdnoise.noise import NoiseModel
from sgdnoise.noise.dynamics import dynamics_names

STEPS = 50
LR = 0.05
#: small eigen budgets (D = 51 for the MLP); a deliberate budget, so non-convergence is ignored.
EIGEN = {"k": 3, "max_matvecs": 12, "on_nonconvergence": "ignore"}
OPTIONS = {
    "gld_leading": {"k": 3},
    "gld_hessian": EIGEN,
    "gld_hessian_top1": {k: v for k, v in EIGEN.items() if k != "k"},
    "gld_const": {"sigma": 0.05},
}


def _members(seeds: tuple[int, ...] = (0, 1)) -> list[Member]:
    out = []
    for seed in seeds:
        for name in dynamics_names():
            out.append(
                Member(
                    name,
                    LR,
                    seed=1000 * seed + len(out),
                    batch_size=4,
                    refresh_every=3,
                    options=OPTIONS.get(name, {}),
                )
            )
    return out


def _alone(problem: sgdnoise.Problem, m: Member, theta0: torch.Tensor, steps: int) -> torch.Tensor:
    problem.set_theta(theta0)
    kw = {} if m.dynamics == "gd" else {"batch_size": m.batch_size}
    if m.structure is not None:
        kw["refresh_every"] = m.refresh_every
    opt = sgdnoise.make_optimizer(m.dynamics, problem, m.lr, seed=m.seed, **kw, **m.options)
    for _ in range(steps):
        opt.step()
    return problem.theta()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("kind", "seeds"), [("mlp", (0, 1)), ("cnn", (0,))])
def test_every_member_equals_its_dynamics_alone(kind, seeds, device):
    """Float64, 50 steps, every dynamics (and two seeds on the MLP): 1e-10 relative to the loop."""
    problem = on_device(make_problem(kind, n=24), device)
    theta0 = problem.theta()
    members = _members(seeds)
    engine = BatchedEngine(problem, members, theta0)
    for _ in range(STEPS):
        engine.step()
    for j, m in enumerate(members):
        ref = _alone(problem, m, theta0, STEPS)
        assert _rel(engine.theta[j], ref) < 1e-10, (m.dynamics, _rel(engine.theta[j], ref))
        assert not torch.equal(ref, theta0)


def test_streaming_members_match(monkeypatch):
    """Above MATERIALIZE_LIMIT no [N, D] matrix is kept: the structures stream, as GLD's do."""
    monkeypatch.setattr(_cov, "MATERIALIZE_LIMIT", 10)
    problem = make_problem("mlp", n=16)
    theta0 = problem.theta()
    members = [m for m in _members((0,)) if m.dynamics not in ("gd", "sgd")]
    engine = BatchedEngine(problem, members, theta0)
    for _ in range(12):
        engine.step()
    for j, m in enumerate(members):
        assert _rel(engine.theta[j], _alone(problem, m, theta0, 12)) < 1e-10, m.dynamics


def test_small_groups_and_resume_match():
    """Members in groups of 3 and chunks of 5 rows, stopped and resumed at step 20, equal one run."""
    problem = make_problem("mlp", n=24)
    theta0 = problem.theta()
    members = _members((0,))
    whole = BatchedEngine(problem, members, theta0)
    for _ in range(30):
        whole.step()
    plan = plan_members(problem, members)
    small = type(plan)(**{**plan.__dict__, "group": 3, "rows": 5, "per_sample_rows": 5})
    first = BatchedEngine(problem, members, theta0, plan=small)
    for _ in range(21):  # a refresh step (21 ≡ 0 mod 3) follows: the resumed run refreshes anyway
        first.step()
    state = first.state_dict()
    second = BatchedEngine(problem, _members((0,)), theta0, plan=small)
    second.load_state_dict(state)
    for _ in range(9):
        second.step()
    assert _rel(second.theta, whole.theta) < 1e-10


def test_float32_members_match(device):
    """Float32: 1e-4 relative over 20 steps for the dynamics without eigen solvers."""
    problem = on_device(make_problem("mlp", dtype=torch.float32, n=24), device)
    theta0 = problem.theta()
    names = ("gd", "sgd", "gld_const", "gld_diag", "gld_full", "gld_multiplicative")
    members = [m for m in _members((0,)) if m.dynamics in names]
    engine = BatchedEngine(problem, members, theta0)
    for _ in range(20):
        engine.step()
    for j, m in enumerate(members):
        assert _rel(engine.theta[j], _alone(problem, m, theta0, 20)) < 1e-4, m.dynamics


def test_evaluate_matches_the_model(device):
    problem = on_device(make_problem("cnn", n=24), device)
    theta0 = problem.theta()
    engine = BatchedEngine(problem, [Member("gd", LR), Member("sgd", LR, batch_size=4)], theta0)
    engine.step()
    x, y = problem.inputs, problem.targets
    ok, loss = engine.evaluate(x, y, chunk=7)
    for j in range(2):
        problem.set_theta(engine.theta[j])
        with torch.no_grad():
            out = problem.model(x)
        assert torch.equal(ok[j], out.argmax(1) == y)
        ref = torch.nn.functional.cross_entropy(out, y, reduction="none")
        torch.testing.assert_close(loss[j], ref, rtol=1e-12, atol=1e-14)
    assert engine.plan.device == str(problem.device)


def test_plan_describes_and_refuses():
    problem = make_problem("mlp", n=24)
    plan = plan_members(problem, _members())
    assert plan.members == 2 * len(dynamics_names()) and plan.group >= 1
    assert "members in groups of" in plan.describe()
    tight = make_problem("mlp", n=24)
    tight._budget = 1000  # bytes: the per-sample buffers alone do not fit
    with pytest.raises(MemoryError, match="members hold"):
        plan_members(tight, _members())


def test_bad_members_are_refused():
    problem = make_problem("mlp", n=24)
    theta0 = problem.theta()
    with pytest.raises(ValueError, match="unknown dynamics"):
        BatchedEngine(problem, [Member("adam", LR)], theta0)
    with pytest.raises(ValueError, match="noise_only_on_refresh"):
        BatchedEngine(
            problem, [Member("gld_diag", LR, options={"noise_only_on_refresh": True})], theta0
        )
    with pytest.raises(TypeError, match="no option"):
        BatchedEngine(problem, [Member("gld_diag", LR, options={"k": 3})], theta0)
    with pytest.raises(ValueError, match="shape"):
        BatchedEngine(problem, [Member("gd", LR)], theta0[:-1])


def _interrupted_members() -> list[Member]:  # SGD draws its batch before the refreshes start
    keep = ("sgd", "gld_diag", "gld_hessian", "gld_hessian_top1")
    return [m for m in _members((0,)) if m.dynamics in keep]


@pytest.mark.parametrize("lockstep", [False, True], ids=["alone", "lockstep"])
@pytest.mark.parametrize("nth", [1, 2, 3], ids=["1st", "2nd", "3rd"])
@pytest.mark.parametrize("at", [0, 6], ids=["start", "resumed"])
def test_an_interrupted_step_continues_as_the_uninterrupted_run(monkeypatch, lockstep, nth, at):
    """Ctrl-C in the nth refresh of a step (after other members' refreshes finished), at step 0
    or on the first step after load_state_dict: both state_dict() and a retried step continue
    exactly as one run (generators, first refreshes and warm starts restored)."""
    problem = make_problem("mlp", n=24)
    theta0 = problem.theta()

    def engine() -> BatchedEngine:
        return BatchedEngine(problem, _interrupted_members(), theta0, lockstep_lanczos=lockstep)

    whole = engine()
    for _ in range(at + 5):
        whole.step()
    stopped = engine()
    if at:
        first = engine()
        for _ in range(at):
            first.step()
        stopped.load_state_dict(first.state_dict())
    before = stopped.state_dict()
    original, calls = NoiseModel.refresh, [0]

    def refresh(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(NoiseModel, "refresh", refresh)
        with pytest.raises(KeyboardInterrupt):
            stopped.step()
    assert calls[0] == nth and stopped.num_steps == at
    after = stopped.state_dict()
    for saved, kept in zip(before["warm_states"], after["warm_states"], strict=True):
        assert saved.keys() == kept.keys()
        assert all(torch.equal(saved[k], kept[k]) for k in saved)
    resumed = engine()
    resumed.load_state_dict(after)
    for _ in range(5):
        stopped.step()  # the retried step and the rest, in the same engine
        resumed.step()
    assert _rel(stopped.theta, whole.theta) < 1e-10
    assert _rel(resumed.theta, whole.theta) < 1e-10
