"""sgdnoise.Monitor: the same numbers as direct calls, no side effects on training, JSON lines,
the README example, and ``sgdnoise plot-monitor``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from sgdnoise.cli import main
from sgdnoise.figures.monitor import plot_monitor
from sgdnoise.measures import hessian_trace
from sgdnoise.monitor import _OFFSET, QUANTITIES, read_monitor


def _setup(n: int = 24, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, x, y


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed + _OFFSET[name])


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-10, abs=1e-14)


def _check_against_direct(record: dict, problem: sgdnoise.Problem, num_samples, b) -> None:
    q, seed = record["quantities"], record["seed"]
    ind = sgdnoise.escape_indicator(
        problem, b, num_samples=num_samples, generator=_gen(seed, "tr_HS")
    )
    assert _close(q["tr_HS"]["value"], ind.tr_HS)
    assert _close(q["tr_HS"]["stderr"], ind.stderr)
    assert _close(q["tr_HS_iso"]["value"], ind.tr_HS_iso)
    assert _close(q["tr_H"]["value"], ind.tr_H) and _close(q["tr_S"]["value"], ind.tr_S)
    pairs = sgdnoise.top_eigenpairs(
        sgdnoise.hessian(problem), 1, generator=_gen(seed, "lambda_max"),
        on_nonconvergence="ignore",
    )  # fmt: skip
    assert _close(q["lambda_max"]["value"], float(pairs.eigenvalues[0]))
    assert q["lambda_max"]["num_matvecs"] == pairs.num_matvecs
    assert q["lambda_max"]["warm_start"] is False
    assert _close(q["b_simple"]["value"], sgdnoise.gradient_noise_scale(problem).b_simple)
    al = sgdnoise.alignment(problem, b, 1, generator=_gen(seed, "alignment"))
    assert _close(q["alignment"]["value"], al.a)
    sh = sgdnoise.expected_sharpness(problem, 0.01, 16, generator=_gen(seed, "sharpness"))
    assert _close(q["sharpness"]["value"], sh.signed)
    assert _close(q["sharpness"]["stderr"], sh.signed_stderr)
    assert _close(q["loss"]["value"], float(problem.loss()))
    for entry in q.values():
        assert entry["seconds"] >= 0 and isinstance(entry["source"], str)


def test_monitor_equals_direct_calls_and_warm_starts(tmp_path) -> None:
    model, x, y = _setup(n=16)
    mon = sgdnoise.Monitor(
        model, F.cross_entropy, (x, y), every=3, batch_size=4, path=tmp_path / "m.jsonl",
        generator=1, sharpness_samples=16,
    )  # fmt: skip
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    record = mon.step(0)
    _check_against_direct(record, problem, None, 4)
    assert mon.step(1) is None and mon.step(2) is None
    # a training step moves θ; the next λ_max is warm-started from the last eigenvector
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.ones_like(p))
    v0 = mon.eigenvector.clone()
    q = mon.step(3)["quantities"]
    pairs = sgdnoise.top_eigenpairs(
        sgdnoise.hessian(problem), 1, generator=_gen(mon.records[-1]["seed"], "lambda_max"),
        v0=v0, on_nonconvergence="ignore",
    )  # fmt: skip
    assert _close(q["lambda_max"]["value"], float(pairs.eigenvalues[0]))
    assert q["lambda_max"]["warm_start"] is True
    assert q["lambda_max"]["num_matvecs"] == pairs.num_matvecs
    assert torch.equal(mon.eigenvector, pairs.eigenvectors[:, 0])
    assert q["tr_HS"]["exact"] is True


def test_monitor_sampled_indicator_equals_direct_call() -> None:
    model, x, y = _setup(n=16)
    mon = sgdnoise.Monitor(
        model, F.cross_entropy, (x, y), quantities=["tr_HS_iso", "tr_HS"], batch_size=2,
        path=None, generator=torch.Generator().manual_seed(3), num_samples=6,
    )  # fmt: skip
    record = mon.measure(7)
    assert record["step"] == 7 and list(record["quantities"]) == ["tr_HS_iso", "tr_HS"]
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
    ind = sgdnoise.escape_indicator(
        problem, 2, num_samples=6, generator=_gen(record["seed"], "tr_HS")
    )
    q = record["quantities"]
    assert not q["tr_HS"]["exact"] and q["tr_HS"]["stderr"] > 0
    assert _close(q["tr_HS"]["value"], ind.tr_HS) and _close(q["tr_HS"]["stderr"], ind.stderr)
    assert _close(q["tr_HS"]["ratio"], ind.ratio)
    assert _close(q["tr_HS_iso"]["value"], ind.tr_HS_iso)


class _Net(nn.Module):
    """BatchNorm and dropout in training mode, and a sub-module the user keeps in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(6, 3))
        self.head.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.fc1(x))))


@pytest.mark.parametrize("net", ["bn_dropout", "mlp"])
def test_monitor_changes_nothing_of_the_training_loop(tmp_path, net) -> None:
    gen = torch.Generator().manual_seed(0)
    if net == "mlp":  # the layer-hook route of per-sample gradients
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model[0].bias.requires_grad_(False)  # a frozen parameter
    else:
        model = _Net()
    x, y = torch.randn(20, 4, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = sgdnoise.Monitor(
        model, F.cross_entropy, (x[:12], y[:12]), every=1, batch_size=4,
        path=tmp_path / "m.jsonl", sharpness_samples=8,
    )  # fmt: skip
    # a training step of the user's loop: gradients in .grad, running statistics updated
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    last = model[-1] if net == "mlp" else model.head[1]
    last.bias.grad = None  # one parameter without a gradient
    torch.manual_seed(123)
    torch.rand(3)  # the loop's global random stream, mid-way
    rng = torch.get_rng_state()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}  # fmt: skip
    modes = {n: m.training for n, m in model.named_modules()}
    assert net == "mlp" or (modes["bn"] and modes["drop"] and not modes["head"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    record = mon.step(0)

    assert set(record["quantities"]) == set(QUANTITIES)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.requires_grad == flags[n]
        obj, value = grads[n]
        assert p.grad is obj, n  # the same tensor object (or None) ...
        assert value is None or torch.equal(p.grad, value), n  # ... with the same numbers
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    # the measurement is of the eval-mode network (BatchNorm's running statistics, no dropout)
    model.eval()
    expected = float(sgdnoise.Problem(model, F.cross_entropy, x[:12], y[:12]).loss())
    assert record["quantities"]["loss"]["value"] == pytest.approx(expected, rel=1e-6)


def test_jsonl_records_and_append(tmp_path) -> None:
    model, x, y = _setup(n=12)
    path = tmp_path / "sub" / "m.jsonl"
    kw = dict(every=2, quantities=["tr_S", "loss", "tr_S"], batch_size=3, path=path)
    mon = sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw)
    assert mon.quantities == ["tr_S", "loss"]
    got = [mon.step(s) for s in range(5)]
    assert [r is not None for r in got] == [True, False, True, False, True]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == mon.records == read_monitor(path)
    assert [r["step"] for r in lines] == [0, 2, 4]
    rec = lines[0]
    assert rec["num_probe"] == 12 and rec["dim"] == 51 and rec["batch_size"] == 3
    assert list(rec["quantities"]) == ["tr_S", "loss"]
    assert rec["quantities"]["tr_S"]["source"] == "noise_trace"
    assert rec["quantities"]["tr_S"]["stderr"] == 0.0
    assert rec["quantities"]["loss"]["stderr"] is None
    cov = sgdnoise.gradient_noise_covariance(sgdnoise.Problem(model, F.cross_entropy, x, y), 3)
    assert rec["quantities"]["tr_S"]["value"] == pytest.approx(float(cov.trace()), rel=1e-12)
    assert rec["seconds"] >= rec["quantities"]["tr_S"]["seconds"]
    # a new monitor starts the file afresh, unless append=True
    sgdnoise.Monitor(model, F.cross_entropy, (x, y), append=True, **kw).step(6)
    assert [r["step"] for r in read_monitor(path)] == [0, 2, 4, 6]
    sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw)
    assert path.read_text() == ""
    # same seed, same numbers (only the generator passed in drives the randomness)
    kw = dict(path=None, generator=5, quantities=["tr_H", "sharpness"], batch_size=3)
    a = sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw)
    b = sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw)

    def numbers(rec: dict) -> dict:
        return {
            k: {f: v for f, v in e.items() if f != "seconds"} for k, e in rec["quantities"].items()
        }

    assert numbers(a.measure(0)) == numbers(b.measure(0))
    assert (
        hessian_trace(sgdnoise.hessian(a.problem))[0] == a.records[0]["quantities"]["tr_H"]["value"]
    )


def test_bad_arguments_are_refused(tmp_path) -> None:
    model, x, y = _setup(n=6)
    with pytest.raises(
        ValueError, match="unknown quantity 'tr_HSS'; valid: loss, tr_HS, tr_HS_iso"
    ):
        sgdnoise.Monitor(
            model, F.cross_entropy, (x, y), quantities=["tr_HSS"], batch_size=2, path=None
        )
    with pytest.raises(ValueError, match="every must be a positive integer"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), every=0, batch_size=2, path=None)
    with pytest.raises(ValueError, match=r"alignment_k = 6 exceeds N − 1 = 5"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), alignment_k=6, batch_size=2, path=None)
    with pytest.raises(ValueError, match=r"num_samples must be .* \[2, 6\]"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), num_samples=7, batch_size=2, path=None)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, N\] = \[1, 6\]"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), batch_size=7, path=None)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or an int seed"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), generator="0", path=None)  # type: ignore[arg-type]


def test_tensorboard_scalars_or_a_clear_error(tmp_path, monkeypatch) -> None:
    model, x, y = _setup(n=8)
    kw = dict(quantities=["loss", "tr_S"], batch_size=4, path=None, tensorboard_dir=tmp_path / "tb")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        have = False
    else:
        have = True
    if have:
        with sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw) as mon:
            mon.step(0)
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not importable
    with pytest.raises(ImportError, match=r"pip install 'sgdnoise\[tensorboard\]'"):
        sgdnoise.Monitor(model, F.cross_entropy, (x, y), **kw)


def test_readme_example_runs_and_plot_monitor(tmp_path, monkeypatch) -> None:
    """The module docstring's example, as written except for fewer and lighter measurements."""
    import sgdnoise.monitor as m

    code = textwrap.dedent(m.__doc__.split("::\n\n", 1)[1].split("\nGuarantees")[0])
    assert "every=2," in code
    code = code.replace(
        "every=2,", 'every=10, quantities=["loss", "lambda_max", "b_simple", "sharpness"],'
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "monitor-example", "exec"), {"__name__": "example"})
    records = read_monitor(tmp_path / "monitor.jsonl")
    assert [r["step"] for r in records] == [0, 10]
    assert records[1]["quantities"]["lambda_max"]["warm_start"] is True
    # plot-monitor on the file, in-process
    assert main(["plot-monitor", "monitor.jsonl", "--out", "fig/mon.png"]) == 0
    assert (tmp_path / "fig" / "mon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_monitor("monitor.jsonl").name == "monitor.png"


def test_plot_monitor_bad_input(tmp_path, capsys) -> None:
    assert main(["plot-monitor", str(tmp_path / "none.jsonl")]) == 2
    assert "no such monitor file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n')
    assert main(["plot-monitor", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line 1 is not a monitor record" in err and len(err.strip().splitlines()) == 1
