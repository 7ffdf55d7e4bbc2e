"""sgdnoise.check: healthy models pass; each kind of fault is flagged by its check, never raised."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from sgdnoise.cli import main

CHECKS = [
    "parameters_finite",
    "data_finite",
    "samples_independent",
    "loss_finite",
    "per_sample_gradients",
    "loss_is_sample_mean",
    "hvp_finite_differences",
    "hvp_symmetry",
    "determinism",
]


class _CNN(nn.Module):
    """Conv → tanh → max-pool → Linear (max-pool is piecewise, like ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.max_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _relu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_CNN, (1, 6, 6)), "relu_mlp": (_relu_mlp, (5,))}


def _data(
    kind: str, dtype: torch.dtype = torch.float64, n: int = 40, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    build, shape = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    x = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model.to(dtype), x.to(dtype), y


def _problem(kind: str, dtype: torch.dtype = torch.float64, **kw: int) -> sgdnoise.Problem:
    model, x, y = _data(kind, dtype, **kw)
    return sgdnoise.Problem(model, F.cross_entropy, x, y)


def _failed(report: sgdnoise.CheckReport) -> list[str]:
    return [c.name for c in report.checks if c.passed is False]


# ---------------------------------------------------------------------------- healthy models
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_healthy_models_pass(kind: str, dtype: torch.dtype) -> None:
    problem = _problem(kind, dtype)
    theta = problem.theta()
    report = sgdnoise.check(problem, generator=0, max_samples=32)
    assert report.ok, str(report)
    assert report.failures == []
    assert report.names == CHECKS
    assert all(c.passed is True for c in report.checks)
    assert report.num_samples == 32
    assert torch.equal(problem.theta(), theta)  # the model is not modified
    text = str(report)
    assert "all checks passed" in text and "hvp_finite_differences" in text
    assert report.to_dict()["ok"] is True


def test_same_seed_same_report() -> None:
    a = sgdnoise.check(_problem("mlp"), generator=3)
    b = sgdnoise.check(_problem("mlp"), generator=torch.Generator().manual_seed(3))
    assert [c.value for c in a.checks] == [c.value for c in b.checks]


# ---------------------------------------------------------------------------- the loss convention
def test_sum_reduction_is_flagged_not_raised() -> None:
    model, x, y = _data("mlp")

    def summed(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, t, reduction="sum")

    # Given as a tuple: whether Problem refuses it or the check finds it, it is a failure.
    report = sgdnoise.check((model, summed, x, y))
    assert not report.ok
    assert "sum" in " ".join(report.failures).lower()

    # A Problem whose loss became a sum after construction: the sample-mean check names it.
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    problem.loss_fn = summed
    report = sgdnoise.check(problem)
    assert "loss_is_sample_mean" in _failed(report)
    text = report["loss_is_sample_mean"].detail
    assert "summed" in text and "reduction='mean'" in text
    assert report["loss_is_sample_mean"].value > 1.0


class _BatchCentre(nn.Module):
    """Subtracts the batch mean when switched on: couples the samples of a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True) if self.on else x


def test_samples_coupled_by_a_batch_statistic_are_flagged() -> None:
    model, x, y = _data("mlp")
    centre = _BatchCentre()
    problem = sgdnoise.Problem(nn.Sequential(model[0], centre, *model[1:]), F.cross_entropy, x, y)
    centre.on = True  # switched on after Problem's own construction-time check
    report = sgdnoise.check(problem)
    assert "loss_is_sample_mean" in _failed(report)
    assert "coupled" in report["loss_is_sample_mean"].detail


def _token_problem() -> sgdnoise.Problem:
    """Sequences of 4 tokens, cross-entropy as a token mean with ignore_index (equal counts)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12, 4), generator=gen)
    model = nn.Linear(5, 3).double()

    def token_mean(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, 3), t.reshape(-1), ignore_index=-100)

    return sgdnoise.Problem(model, token_mean, x, y)


def test_token_mean_with_ignore_index_is_flagged() -> None:
    problem = _token_problem()
    problem.targets[1::2, 2:] = -100  # every other sequence now counts 2 tokens, not 4
    report = sgdnoise.check(problem, indices=range(6))
    assert "loss_is_sample_mean" in _failed(report)
    assert "weighted unequally" in report["loss_is_sample_mean"].detail

    problem = _token_problem()
    problem.targets[3] = -100  # a sequence with no counted token: its own loss is 0/0
    report = sgdnoise.check(problem, indices=range(6))
    assert "loss_is_sample_mean" in _failed(report)
    detail = report["loss_is_sample_mean"].detail
    assert "samples [3] alone have a non-finite loss" in detail and "ignore_index" in detail


# ---------------------------------------------------------------------------- randomness
def test_dropout_in_training_mode_is_a_failure_not_an_exception() -> None:
    model, x, y = _data("mlp")
    net = nn.Sequential(model[0], nn.Dropout(0.5), *model[1:]).train()
    try:
        report = sgdnoise.check(sgdnoise.Problem(net, F.cross_entropy, x, y))
    except (ValueError, RuntimeError):  # refused at construction: the tuple form reports it
        report = sgdnoise.check((net, F.cross_entropy, x, y))
    assert not report.ok
    text = " ".join(report.failures)
    assert "training mode" in text and "eval()" in text
    assert report["samples_independent"].passed is False  # named for what it is


def test_batchnorm_in_training_mode_is_named_samples_independent() -> None:
    model, x, y = _data("mlp")
    bn = nn.BatchNorm1d(model[0].out_features).to(x.dtype)
    net = nn.Sequential(model[0], bn, *model[1:]).train()
    report = sgdnoise.check(sgdnoise.Problem(net, F.cross_entropy, x, y))
    assert _failed(report) == ["samples_independent"]
    assert "BatchNorm1d" in report["samples_independent"].detail
    assert report["loss_finite"].passed is None  # skipped, not mislabelled as a failure


class _Noise(nn.Module):
    """Adds fresh Gaussian noise when switched on (augmentation inside the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.3 * torch.randn_like(x) if self.on else x


def test_random_forward_is_flagged_by_determinism() -> None:
    model, x, y = _data("mlp")
    noise = _Noise()
    problem = sgdnoise.Problem(nn.Sequential(model[0], noise, *model[1:]), F.cross_entropy, x, y)
    noise.on = True
    report = sgdnoise.check(problem)
    assert "determinism" in _failed(report)
    assert "random" in report["determinism"].detail


# ---------------------------------------------------------------------------- second derivatives
class _BadSquare(torch.autograd.Function):
    """x² whose derivative is deliberately wrong (x instead of 2x), in backward and jvp alike."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return x * g

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return x * t


class _Cube(torch.autograd.Function):
    """x³ with a correct backward 3x²·g, whose x² goes through _BadSquare: the first derivative
    is right, the second is wrong."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * _BadSquare.apply(x) * g

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * _BadSquare.apply(x) * t


class _CubeLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Cube.apply(x)


@pytest.mark.parametrize(
    ("dtype", "float64_reference"),
    [(torch.float64, True), (torch.float32, True), (torch.float32, False)],
    ids=["f64", "f32", "f32-native-differences"],
)
def test_wrong_second_derivative_is_caught_by_finite_differences(
    dtype: torch.dtype, float64_reference: bool
) -> None:
    model, x, y = _data("mlp", dtype)
    net = nn.Sequential(model[0], _CubeLayer(), model[2])
    problem = sgdnoise.Problem(net, F.cross_entropy, x, y)
    # the first derivative is right: gradients match autograd of the plain x**3 model
    ref = nn.Sequential(model[0], nn.Identity(), model[2])
    out = ref[2](ref[0](x) ** 3)
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(ref.parameters()))
    torch.testing.assert_close(problem.gradient(), problem.flatten(grads))

    report = sgdnoise.check(problem, float64_reference=float64_reference)
    assert _failed(report) == ["hvp_finite_differences"], str(report)
    result = report["hvp_finite_differences"]
    assert result.value is not None and result.tolerance is not None
    assert result.value > 10 * result.tolerance
    assert "second derivative" in result.detail


class _Float32Only(nn.Module):
    """A layer that computes in float32 whatever its parameters' dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.lin.weight.float(), self.lin.bias.float())


def test_float32_model_differences_in_float64_with_a_fallback() -> None:
    problem = _problem("relu_mlp", torch.float32)
    result = sgdnoise.check(problem)["hvp_finite_differences"]
    assert result.passed and "float64 copy of the model" in result.detail
    assert result.value is not None and result.value < 1e-4  # far below float32's own reach

    _, x, y = _data("mlp", torch.float32)
    problem = sgdnoise.Problem(nn.Sequential(_Float32Only(), nn.Tanh()), F.cross_entropy, x, y)
    report = sgdnoise.check(problem)
    assert report.ok, str(report)
    assert "float64 copy failed" in report["hvp_finite_differences"].detail


# ---------------------------------------------------------------------------- per-sample gradients
def test_wrong_per_sample_gradients_are_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _problem("mlp")
    right = problem.per_sample_gradients

    def wrong(indices=None, theta=None, **kw):  # type: ignore[no-untyped-def]
        G = right(indices, theta, **kw).clone()
        G[:, : problem.param_numels[0]] *= 1.4  # e.g. a weight used twice, counted once
        return G

    monkeypatch.setattr(problem, "per_sample_gradients", wrong)
    report = sgdnoise.check(problem)
    assert _failed(report) == ["per_sample_gradients"]
    detail = report["per_sample_gradients"].detail
    assert "per-sample gradients" in detail and "method='vmap'" in detail


def test_an_exception_inside_a_check_is_that_checks_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = _problem("mlp")

    def broken(*args, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("derivative for aten::something is not implemented")

    monkeypatch.setattr(problem, "hvp", broken)
    if hasattr(problem, "hvp_unchecked"):
        monkeypatch.setattr(problem, "hvp_unchecked", broken)
    report = sgdnoise.check(problem)
    assert set(_failed(report)) == {"hvp_finite_differences", "hvp_symmetry", "determinism"}
    assert "RuntimeError: derivative for aten::something" in report.failures[0]
    assert "no derivative rule" in report.failures[0]  # the hint


# ---------------------------------------------------------------------------- finiteness
def test_non_finite_parameters_and_loss() -> None:
    problem = _problem("mlp")
    with torch.no_grad():
        problem.model[0].weight[0, 0] = float("nan")
    report = sgdnoise.check(problem)
    assert _failed(report) == ["parameters_finite"]
    assert "0.weight (1 of 40)" in report.failures[0]
    assert all(c.passed is None for c in report.checks[1:])

    problem = _problem("mlp")
    problem.inputs[3, 0] = float("inf")  # tanh(inf) = 1: the loss is finite, the gradient not
    report = sgdnoise.check(problem, indices=range(8))
    assert _failed(report) == ["data_finite"]
    assert "inputs of samples [3]" in report.failures[0]

    def unstable(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # log(softmax) underflows
        return -torch.log(out.softmax(1).gather(1, t[:, None])).mean()

    problem = _problem("relu_mlp")
    problem.inputs[5] *= 1e4  # huge logits: the target's probability underflows to 0
    with torch.no_grad():
        problem.targets[5] = problem.model(problem.inputs[5:6]).argmin()
    problem.loss_fn = unstable
    report = sgdnoise.check(problem, indices=[1, 5, 7])
    assert _failed(report) == ["loss_finite"]
    assert "samples [5]" in report.failures[0] and "stable loss" in report.failures[0]


def test_argument_errors() -> None:
    problem = _problem("mlp")
    with pytest.raises(ValueError, match="max_samples"):
        sgdnoise.check(problem, max_samples=0)
    with pytest.raises(TypeError, match="generator"):
        sgdnoise.check(problem, generator="0")  # type: ignore[arg-type]
    report = sgdnoise.check("not a problem")  # type: ignore[arg-type]
    assert not report.ok and "sgdnoise.Problem" in report.failures[0]


# ---------------------------------------------------------------------------- command line
_MODULE = """
import torch
import torch.nn.functional as F
from torch import nn
import sgdnoise

def _data():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (20,), generator=gen)

def make():
    model, x, y = _data()
    return sgdnoise.Problem(model, F.cross_entropy, x, y)

def make_tuple():
    model, x, y = _data()
    return model, F.cross_entropy, x, y

def make_sum():
    model, x, y = _data()
    return model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y

def make_wrong():
    return 42

def make_raises():
    raise RuntimeError("no data here\\nsecond line")

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("usermodel") / "usermodel.py"
    path.write_text(textwrap.dedent(_MODULE))
    return path


def test_cli_exit_codes(
    model_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check", f"{model_file}:make", "--max-samples", "8"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["check", f"{model_file}:make_tuple", "--dtype", "float32", "--seed", "1"]) == 0
    assert "torch.float32" in capsys.readouterr().out

    assert main(["check", f"{model_file}:make_sum"]) == 1
    assert "sum" in capsys.readouterr().out.lower()

    # bad input: exit 2 with one line on stderr
    monkeypatch.chdir(model_file.parent)
    for spec, words in [
        (f"{model_file}:make_wrong", "returned int"),
        (f"{model_file}:make_raises", "raised RuntimeError: no data here"),
        (f"{model_file}:missing", "has no function 'missing'"),
        (f"{model_file}:NOT_A_FUNCTION", "not a function"),
        ("no_such_module_xyz:make", "not found"),
        (f"{model_file.parent / 'nope.py'}:make", "no such Python file"),
        ("usermodel", "MODULE:FUNCTION"),
    ]:
        assert main(["check", spec]) == 2, spec
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    # a module importable from the current folder by its dotted name
    assert main(["check", "usermodel:make_tuple", "--max-samples", "4"]) == 0


def test_cli_console_script(model_file: Path) -> None:
    script = Path(sys.executable).parent / "sgdnoise"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sgdnoise.cli"]
    done = subprocess.run(
        [*cmd, "check", f"{model_file}:make"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "PASS  hvp_finite_differences" in done.stdout
