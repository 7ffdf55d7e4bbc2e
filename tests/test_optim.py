"""Tests for sgdnoise.optim: GD, mini-batch SGD and GLD through one code path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from sgdnoise.noise import NoiseModel
from sgdnoise.optim import factor_noise, sample_batch

F64 = torch.float64
LR = 0.2


def make_problem(dtype: torch.dtype = F64, n: int = 30, seed: int = 0) -> sgdnoise.Problem:
    """A tanh MLP 4 → 5 → 3 (D = 43) with cross-entropy on n random points."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
    model = model.to(dtype)
    x = torch.randn((n, 4), generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x, y)


def small_options(name: str) -> dict:
    return {"k": 3} if name in ("gld_leading", "gld_hessian") else {}


def trajectory(name: str, seed: int, steps: int = 3, dtype=F64, **kw) -> torch.Tensor:
    problem = make_problem(dtype)
    opt = sgdnoise.make_optimizer(
        name, problem, LR, generator=seed, batch_size=5, **{**small_options(name), **kw}
    )
    thetas = [problem.theta()]
    for _ in range(steps):
        opt.step()
        thetas.append(problem.theta())
    return torch.stack(thetas)


# --------------------------------------------------------------------------------------------
# Functional forms
# --------------------------------------------------------------------------------------------


def test_gld_step_is_pure_and_broadcasts():
    theta = torch.randn(6, 3, dtype=F64)
    g = torch.randn(6, 3, dtype=F64)
    n = torch.randn(6, 3, dtype=F64)
    before = theta.clone()
    out = sgdnoise.gld_step(theta, g, 0.1, n)
    assert torch.equal(theta, before)
    assert torch.allclose(out, theta - 0.1 * (g + n))
    assert torch.allclose(sgdnoise.gld_step(theta, g, 0.1), theta - 0.1 * g)


def test_factor_noise_is_Lz_per_leading_index():
    L = torch.randn(4, 3, 2, dtype=F64)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    n = factor_noise(L, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(n, torch.einsum("rdk,rk->rd", L, z))


@pytest.mark.parametrize("replacement", [True, False])
def test_sample_batch(replacement):
    idx = sample_batch(10, 10, generator=torch.Generator().manual_seed(0), replacement=replacement)
    assert idx.shape == (10,) and int(idx.min()) >= 0 and int(idx.max()) < 10
    if not replacement:
        assert sorted(idx.tolist()) == list(range(10))


# --------------------------------------------------------------------------------------------
# Contract over every dynamics: same seed ⇒ identical trajectories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sgdnoise.dynamics_names())
def test_same_seed_identical_trajectories(name):
    steps = 2 if "hessian" in name else 3  # Hessian Lanczos is the slow part: one refresh each
    a = trajectory(name, seed=7, steps=steps, refresh_every=2)
    b = trajectory(name, seed=7, steps=steps, refresh_every=2)
    assert torch.equal(a, b)
    assert bool(torch.isfinite(a).all())
    if name != "gd":
        assert not torch.equal(a, trajectory(name, seed=8, steps=steps, refresh_every=2))


@pytest.mark.parametrize("name", ["gld_full", "gld_diag", "gld_leading", "gld_hessian"])
def test_reused_per_sample_buffer_changes_nothing(name):
    """GLD fills one [N, D] buffer every refresh and lets the structure centre it in place; the
    trajectory is bit-for-bit that of fresh matrices every refresh."""
    runs = []
    for reuse in (True, False):
        problem = make_problem()
        opt = sgdnoise.make_optimizer(
            name, problem, LR, generator=3, batch_size=5, refresh_every=1, **small_options(name)
        )
        thetas = []
        for _ in range(4):
            if not reuse:
                opt._per_sample_buffer = None
            opt.step()
            thetas.append(problem.theta())
        runs.append(torch.stack(thetas))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["gd", "sgd", "gld_diag", "gld_leading", "gld_multiplicative"])
def test_float32_runs_and_keeps_dtype(name):
    traj = trajectory(name, seed=0, steps=2, dtype=torch.float32)
    assert traj.dtype == torch.float32 and bool(torch.isfinite(traj).all())


def test_dynamics_names_cover_every_structure():
    names = sgdnoise.dynamics_names()
    assert names[:2] == ("gd", "sgd")
    assert {n[4:] for n in names[2:]} == set(sgdnoise.noise_structures())


# --------------------------------------------------------------------------------------------
# What a step does
# --------------------------------------------------------------------------------------------


def test_gld_step_equals_gradient_plus_a_fresh_sample():
    problem = make_problem()
    theta0 = problem.theta()
    model = sgdnoise.noise_model("full", problem, batch_size=5)
    n0 = model.sample(1, generator=torch.Generator().manual_seed(3))[0]
    grad = problem.gradient()
    opt = sgdnoise.GLD(problem.model.parameters(), LR, noise="full", problem=problem,
                       batch_size=5, generator=torch.Generator().manual_seed(3))  # fmt: skip
    loss = opt.step()
    assert torch.allclose(problem.theta(), theta0 - LR * (grad + n0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(loss, problem.loss(theta0))
    assert opt.last.refreshed and opt.last.step == 0
    assert abs(opt.last.noise_norm - float(n0.norm())) < 1e-12


def test_refresh_schedule_and_noise_every_step():
    problem = make_problem()
    opt = sgdnoise.GLD(problem.model.parameters(), LR, noise="diag", problem=problem,
                       batch_size=5, refresh_every=3, generator=0)  # fmt: skip
    rec = sgdnoise.run_dynamics(opt, 7)
    assert [r["refreshed"] for r in rec] == [True, False, False, True, False, False, True]
    assert all(r["noise_norm"] > 0 for r in rec)  # a fresh draw at every step
    assert opt.noise.num_refreshes == 3


def test_noise_only_on_refresh_reproduces_the_released_quirk():
    problem = make_problem()
    opt = sgdnoise.GLD(problem.model.parameters(), LR, noise="leading", problem=problem,
                       batch_size=5, refresh_every=3, generator=0, k=3,
                       noise_only_on_refresh=True)  # fmt: skip
    rec = sgdnoise.run_dynamics(opt, 6)
    assert [r["noise_norm"] > 0 for r in rec] == [True, False, False, True, False, False]


@pytest.mark.parametrize("noise", ["dynamic", "hessian_top1", "full"])
def test_refresh_steps_reuse_per_sample_gradients(noise, monkeypatch):
    """On refresh steps ∇L is the mean of the per-sample gradients: no second gradient pass."""
    problem = make_problem()
    problem.hvp(torch.zeros(problem.dim, 1, dtype=problem.dtype))  # the one-time H@v self-check
    calls = {"full": 0, "per_sample": 0}
    orig_full, orig_ps = problem.loss_and_gradient, problem.per_sample_gradients_and_losses

    def full(*a, **k):
        calls["full"] += 1
        return orig_full(*a, **k)

    def ps(*a, **k):
        calls["per_sample"] += 1
        return orig_ps(*a, **k)

    monkeypatch.setattr(problem, "loss_and_gradient", full)
    monkeypatch.setattr(problem, "per_sample_gradients_and_losses", ps)
    opt = sgdnoise.GLD(problem.model.parameters(), LR, noise=noise, problem=problem,
                       batch_size=5, refresh_every=2, generator=0)  # fmt: skip
    opt.step()
    assert calls == {"full": 0, "per_sample": 1}
    opt.step()  # not a refresh step: one full-batch pass, no per-sample gradients
    assert calls == {"full": 1, "per_sample": 1}


def test_multiplicative_takes_one_weighted_pass_and_no_sigma(monkeypatch):
    problem = make_problem()

    def boom(*a, **k):
        raise AssertionError("multiplicative GLD must not compute per-sample gradients")

    monkeypatch.setattr(problem, "per_sample_gradients", boom)
    monkeypatch.setattr(problem, "per_sample_gradients_and_losses", boom)
    monkeypatch.setattr(problem, "loss_and_gradient", boom)
    opt = sgdnoise.make_optimizer("gld_multiplicative", problem, LR, generator=0, batch_size=5)
    sgdnoise.run_dynamics(opt, 3)


@pytest.mark.parametrize("replacement", [True, False])
def test_multiplicative_sgd_weights_reproduce_minibatch_sgd(replacement):
    """GLD with SGD's own re-weighting is SGD, step for step (same generator stream)."""
    p1, p2 = make_problem(), make_problem()
    sgd = sgdnoise.make_optimizer("sgd", p1, LR, generator=5, batch_size=6, replacement=replacement)
    mult = sgdnoise.make_optimizer("gld_multiplicative", p2, LR, generator=5, batch_size=6,
                                   replacement=replacement, distribution="sgd")  # fmt: skip
    for _ in range(4):
        sgd.step()
        mult.step()
        assert torch.allclose(p1.theta(), p2.theta(), rtol=1e-10, atol=1e-12)


def test_sgd_with_the_whole_data_without_replacement_is_gd():
    p1, p2 = make_problem(), make_problem()
    sgdnoise.run_dynamics(sgdnoise.make_optimizer("gd", p1, LR), 3)
    sgd = sgdnoise.make_optimizer("sgd", p2, LR, generator=0, batch_size=30, replacement=False)
    rec = sgdnoise.run_dynamics(sgd, 3)
    assert torch.allclose(p1.theta(), p2.theta(), rtol=1e-12, atol=1e-14)
    assert rec[0]["full_batch"] is False


def test_gd_decreases_the_loss():
    problem = make_problem()
    rec = sgdnoise.run_dynamics(sgdnoise.make_optimizer("gd", problem, 0.5), 20, record_every=5)
    assert [r["step"] for r in rec] == [4, 9, 14, 19]
    assert rec[-1]["loss"] < rec[0]["loss"]


def test_run_dynamics_callback_and_stop():
    problem = make_problem()
    opt = sgdnoise.make_optimizer("gld_const", problem, LR, generator=0, sigma=0.1)
    seen = []

    def cb(o):
        seen.append(o.num_steps)
        return {"test": o.num_steps, "stop": o.num_steps == 3}

    rec = sgdnoise.run_dynamics(opt, 10, callback=cb)
    assert seen == [1, 2, 3] and [r["test"] for r in rec] == [1, 2, 3]


def test_lr_scheduler_changes_the_step():
    p1, p2 = make_problem(), make_problem()
    o1 = sgdnoise.make_optimizer("gd", p1, LR)
    sched = torch.optim.lr_scheduler.StepLR(o1, step_size=1, gamma=0.5)
    o1.step()
    sched.step()
    assert o1.lr == pytest.approx(LR / 2)
    o1.step()
    o2 = sgdnoise.make_optimizer("gd", p2, LR)
    o2.step()
    o2.param_groups[0]["lr"] = LR / 2
    o2.step()
    assert torch.allclose(p1.theta(), p2.theta())


@pytest.mark.parametrize("name", ["sgd", "gld_diag", "gld_hessian", "gld_leading"])
def test_state_dict_resume_continues_identically(name):
    # The eigen structures run on a Lanczos budget (so the warm start matters) and refresh every
    # 2 steps; the state is saved on a refresh boundary, where the resumed run refreshes.
    kw = (
        {"refresh_every": 2, "max_matvecs": 4, "on_nonconvergence": "ignore"}
        if name
        in (
            "gld_hessian",
            "gld_leading",
        )
        else {}
    )
    kw = {**small_options(name), **kw}
    problem = make_problem()
    opt = sgdnoise.make_optimizer(name, problem, LR, generator=0, batch_size=5, **kw)
    sgdnoise.run_dynamics(opt, 2)
    state, theta = opt.state_dict(), problem.theta()
    sgdnoise.run_dynamics(opt, 3)
    want = problem.theta()
    problem2 = make_problem()
    problem2.set_theta(theta)
    opt2 = sgdnoise.make_optimizer(name, problem2, LR, generator=123, batch_size=5, **kw)
    opt2.load_state_dict(state)
    assert opt2.num_steps == 2
    sgdnoise.run_dynamics(opt2, 3)
    assert torch.equal(problem2.theta(), want)


@pytest.mark.parametrize("name", ["gld_hessian", "gld_leading"])
@pytest.mark.parametrize("where", ["after_load", "mid_run", "prebuilt"])
def test_an_interrupted_refresh_continues_as_the_uninterrupted_run(monkeypatch, name, where):
    """Ctrl-C inside a refresh — the forced one after load_state_dict (here off the refresh
    schedule), a scheduled one in a running optimizer, or the forced one after loading into an
    optimizer holding a prebuilt model: state_dict() keeps the warm start that refresh started
    from, and the retried step and the rest equal the same steps without the interruption."""
    kw = {
        **small_options(name),
        "refresh_every": 2,
        "max_matvecs": 4,
        "on_nonconvergence": "ignore",
    }
    problem = make_problem()
    opt = sgdnoise.make_optimizer(name, problem, LR, generator=0, batch_size=5, **kw)
    sgdnoise.run_dynamics(opt, 3)
    state, theta = opt.state_dict(), problem.theta()

    def ready() -> tuple[sgdnoise.Problem, torch.optim.Optimizer]:
        """The optimizer just before the step to interrupt (a refresh step)."""
        p = make_problem()
        if where == "mid_run":  # t = 4 is a scheduled refresh (refresh_every = 2)
            o = sgdnoise.make_optimizer(name, p, LR, generator=0, batch_size=5, **kw)
            sgdnoise.run_dynamics(o, 4)
            return p, o
        p.set_theta(theta)
        if where == "prebuilt":
            options = {k: v for k, v in kw.items() if k != "refresh_every"}
            built = sgdnoise.noise_model(name.removeprefix("gld_"), p, batch_size=5, **options)
            o = sgdnoise.GLD(p.model.parameters(), LR, noise=built, problem=p, generator=9,
                             refresh_every=2)  # fmt: skip
        else:
            o = sgdnoise.make_optimizer(name, p, LR, generator=123, batch_size=5, **kw)
        o.load_state_dict(state)  # the next step (t = 3) refreshes: forced
        return p, o

    p1, o1 = ready()
    sgdnoise.run_dynamics(o1, 4)
    p2, o2 = ready()
    saved = o2.state_dict()["sgdnoise"]["noise_warm_state"]
    calls = [0]

    def refresh(self, *args, **kwargs):
        calls[0] += 1
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(NoiseModel, "refresh", refresh)
        with pytest.raises(KeyboardInterrupt):
            o2.step()
    assert calls[0] == 1
    kept = o2.state_dict()["sgdnoise"]["noise_warm_state"]
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in saved)
    sgdnoise.run_dynamics(o2, 4)  # the retried step and three more
    assert torch.equal(p2.theta(), p1.theta())


def test_a_built_noise_model_can_be_passed():
    problem = make_problem()
    model = sgdnoise.noise_model("leading", problem, batch_size=5, k=2)
    opt = sgdnoise.GLD(problem.model.parameters(), LR, noise=model, problem=problem,
                       generator=0, refresh_every=2)  # fmt: skip
    rec = sgdnoise.run_dynamics(opt, 3)
    assert [r["refreshed"] for r in rec] == [False, False, True]  # built at θ₀ already
    assert opt.noise is model and model.num_refreshes == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sgd", "gld_full", "gld_hessian", "gld_multiplicative"])
def test_cuda_follows_the_problem(name):
    problem = make_problem()
    problem.model.cuda()
    problem = sgdnoise.Problem(
        problem.model, F.cross_entropy, problem.inputs.cuda(), problem.targets.cuda()
    )
    opt = sgdnoise.make_optimizer(
        name, problem, LR, generator=0, batch_size=5, **small_options(name)
    )
    sgdnoise.run_dynamics(opt, 2)
    assert problem.theta().device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_say_what_is_valid():
    problem = make_problem()
    params = problem.model.parameters
    with pytest.raises(ValueError, match="unknown dynamics 'gld_lead'.*gld_leading"):
        sgdnoise.make_optimizer("gld_lead", problem, LR, generator=0)
    with pytest.raises(ValueError, match="unknown noise structure 'lead'; valid names: const"):
        sgdnoise.GLD(params(), LR, noise="lead", problem=problem, generator=0)
    with pytest.raises(TypeError, match="'leading' has no option"):
        sgdnoise.GLD(params(), LR, noise="leading", problem=problem, generator=0, kk=2)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        sgdnoise.GD(params(), -1.0, problem=problem)
    with pytest.raises(ValueError, match="refresh_every must be a positive int"):
        sgdnoise.GLD(params(), LR, noise="diag", problem=problem, generator=0, refresh_every=0)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, N\]"):
        sgdnoise.GLD(params(), LR, noise="diag", problem=problem, generator=0, batch_size=31)
    with pytest.raises(ValueError, match="exactly the problem's trainable parameters"):
        sgdnoise.GD(list(params())[:1], LR, problem=problem)
    # one randomness rule: no generator means seed 0, so the default is reproducible
    a, b = (
        sgdnoise.make_optimizer("sgd", problem, LR),
        sgdnoise.make_optimizer("sgd", problem, LR, seed=0),
    )
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    with pytest.raises(TypeError, match="takes no closure"):
        sgdnoise.GD(params(), LR, problem=problem).step(lambda: 0.0)
