"""Shared fixtures: small models of three kinds (MLP, CNN, partly frozen) with data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter in the middle of θ
    model.register_buffer("unused", torch.ones(2))
    return model


MODELS = {"mlp": (_mlp, (4,)), "cnn": (_SmallCNN, (1, 6, 6)), "frozen": (_frozen, (4,))}


def make_problem(
    kind: str,
    dtype: torch.dtype = torch.float64,
    n: int = 24,
    seed: int = 0,
    chunk_size: int | None = None,
) -> sgdnoise.Problem:
    """A problem with a model of ``kind`` and n random samples, deterministic in ``seed``."""
    build, in_shape = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    model = model.to(dtype)
    x = torch.randn((n, *in_shape), generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return sgdnoise.Problem(model, F.cross_entropy, x, y, chunk_size=chunk_size)


@pytest.fixture(params=sorted(MODELS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the device-parity tests run on: CUDA when present, else the CPU.

    Tests that take this fixture run on the GPU of a CUDA machine (``scripts/device_check.sh``)
    and on the CPU elsewhere — one test, not a CPU and a CUDA copy. Float64 tolerances are the
    same on both; float32 ones are stated in each test.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(problem: sgdnoise.Problem, device: torch.device) -> sgdnoise.Problem:
    """The same problem (model, data, chunking) with the model and the data on ``device``."""
    if problem.device == device:
        return problem
    model = problem.model.to(device)
    return sgdnoise.Problem(
        model,
        problem.loss_fn,
        problem.inputs.to(device),
        problem.targets.to(device),
        chunk_size=problem.chunk_size,
    )


@pytest.fixture(autouse=True)
def _torch_global_state_is_restored():
    """A test that leaves torch's global state changed (threads, default dtype, grad mode) makes
    later tests depend on the order they run in: the float32 rounding of a pass depends on the
    thread count. Fail the leaking test itself."""
    before = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    yield
    after = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
    assert after == before, f"the test changed torch's global state {before} -> {after}"
