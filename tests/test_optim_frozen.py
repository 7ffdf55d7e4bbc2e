"""Optimizers on models with frozen parameters (issue 10, case 14).

``GD/MinibatchSGD/GLD(model.parameters(), ...)`` and ``make_optimizer`` take the whole parameter
list, skip the frozen ones (bit-for-bit unchanged after steps), train exactly the problem's
trainable parameters and say which (``trained_parameter_names``). Steps are checked against a
float64 reference computed by hand (a plain backward pass over the loss).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise

F64 = torch.float64
LR = 0.1


def _problem(n: int = 12) -> sgdnoise.Problem:
    gen = torch.Generator().manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    model[0].bias.requires_grad_(False)  # frozen, in the middle of the parameter list
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (n,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x, y)


def _reference_gd_step(problem: sgdnoise.Problem) -> list[torch.Tensor]:
    """θ − η ∇L for each trainable tensor, by an ordinary backward pass on a copy-free graph."""
    model = problem.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss = problem.loss_fn(model(problem.inputs), problem.targets)
    grads = torch.autograd.grad(loss, trainable)
    return [(p - LR * g).detach() for p, g in zip(trainable, grads, strict=True)]


BUILDERS = {
    "GD": lambda m, p: sgdnoise.GD(m.parameters(), LR, problem=p),
    "MinibatchSGD": lambda m, p: sgdnoise.MinibatchSGD(
        m.parameters(), LR, problem=p, batch_size=3, generator=0
    ),
    "GLD-diag": lambda m, p: sgdnoise.GLD(
        m.parameters(), LR, noise="diag", problem=p, batch_size=3, generator=0
    ),
    "GLD-full": lambda m, p: sgdnoise.GLD(
        m.parameters(), LR, noise="full", problem=p, batch_size=3, generator=0
    ),
    "GLD-hessian": lambda m, p: sgdnoise.GLD(
        m.parameters(), LR, noise="hessian", problem=p, batch_size=3, generator=0, k=2
    ),
    "GLD-multiplicative": lambda m, p: sgdnoise.GLD(
        m.parameters(), LR, noise="multiplicative", problem=p, batch_size=3, generator=0
    ),
    "make_optimizer-gd": lambda m, p: sgdnoise.make_optimizer("gd", p, LR),
    "make_optimizer-sgd": lambda m, p: sgdnoise.make_optimizer(
        "sgd", p, LR, generator=0, batch_size=3
    ),
    "make_optimizer-gld_leading": lambda m, p: sgdnoise.make_optimizer(
        "gld_leading", p, LR, generator=0, batch_size=3, k=2
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_frozen_parameters_are_skipped_and_never_move(name: str) -> None:
    problem = _problem()
    model = problem.model
    frozen = model[0].bias
    frozen0 = frozen.detach().clone()
    expected = _reference_gd_step(problem)
    opt = BUILDERS[name](model, problem)
    assert opt.trained_parameter_names == ["0.weight", "2.weight", "2.bias"]
    assert opt.trained_parameter_names == problem.param_names
    assert opt.frozen_parameter_names == ["0.bias"]
    assert len(opt.param_groups[0]["params"]) == 3
    for step in range(3):
        opt.step()
        assert torch.equal(frozen.detach(), frozen0)  # bit for bit
        assert not frozen.requires_grad
        if step == 0 and name in ("GD", "make_optimizer-gd"):
            got = [p.detach() for p in model.parameters() if p.requires_grad]
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


def test_make_optimizer_reports_the_frozen_names() -> None:
    problem = _problem()
    opt = sgdnoise.make_optimizer("gld_dynamic", problem, LR, generator=0, batch_size=3)
    assert opt.frozen_parameter_names == ["0.bias"]
    assert opt.trained_parameter_names == ["0.weight", "2.weight", "2.bias"]


def test_a_missing_parameter_is_named() -> None:
    problem = _problem()
    params = [p for n, p in problem.model.named_parameters() if n != "2.weight"]
    with pytest.raises(ValueError, match=r"missing 2\.weight") as info:
        sgdnoise.GD(params, LR, problem=problem)
    msg = str(info.value)
    assert "\n" not in msg and "problem.model.parameters()" in msg
    assert "0.weight, 2.weight, 2.bias" in msg  # what was expected


def test_an_extra_tensor_is_named() -> None:
    problem = _problem()
    stray = nn.Parameter(torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"extra a tensor of shape \[5, 2\] not in problem.model"):
        sgdnoise.GLD(
            [*problem.model.parameters(), stray], LR, noise="diag", problem=problem, generator=0
        )


def test_a_parameter_unfrozen_after_the_problem_was_built_is_named() -> None:
    problem = _problem()
    problem.model[0].bias.requires_grad_(True)
    with pytest.raises(ValueError, match=r"extra 0\.bias \(trainable but not in the Problem's θ"):
        sgdnoise.GD(problem.model.parameters(), LR, problem=problem)


def test_only_trainable_list_still_works_and_matches() -> None:
    problem = _problem()
    expected = _reference_gd_step(problem)
    opt = sgdnoise.GD(
        [p for p in problem.model.parameters() if p.requires_grad], LR, problem=problem
    )
    assert opt.frozen_parameter_names == []
    opt.step()
    got = [p.detach() for p in problem.model.parameters() if p.requires_grad]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


def test_a_parameter_frozen_after_the_problem_was_built_is_named() -> None:
    problem = _problem()
    problem.model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"missing 2\.weight \(requires_grad=False now but"):
        sgdnoise.GD(problem.model.parameters(), LR, problem=problem)
