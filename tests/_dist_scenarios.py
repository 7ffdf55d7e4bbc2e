"""Measurements run once on a whole data set and once sharded over gloo ranks (tests/_dist_worker.py);
test_distributed.py compares them. Every quantity comes back as a dict of float64 tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from sgdnoise.linalg import covariance

N = 23
STRUCTURES = sgdnoise.noise_structures()  # every registered structure
OPTIONS: dict[str, dict[str, Any]] = {"leading": {"k": 2}, "hessian": {"k": 2}}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (N,), generator=g
    )


def shard_bounds(world: int) -> list[int]:
    """Unequal shard sizes (offsets of each rank, then N)."""
    sizes = {1: [N], 2: [9, 14], 3: [5, 11, 7]}[world]
    return [sum(sizes[:r]) for r in range(world + 1)]


def problem(rank: int, world: int, chunk_size: int | None = 8) -> sgdnoise.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = data()
    b = shard_bounds(world)
    return sgdnoise.Problem(
        model,
        F.cross_entropy,
        x[b[rank] : b[rank + 1]],
        y[b[rank] : b[rank + 1]],
        chunk_size=chunk_size,
    )


def _floats(result: Any, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in dataclasses.fields(result):
        v = getattr(result, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}.{f.name}"] = torch.tensor(float(v), dtype=torch.float64)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            out[f"{prefix}.{f.name}"] = v.detach().double().clone()
    return out


def measurements(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """Every public quantity on one problem (same calls on every rank)."""
    g = torch.Generator().manual_seed(5)
    V = torch.randn(p.dim, 4, generator=g, dtype=torch.float64)
    loss, grad = p.loss_and_gradient()
    H = sgdnoise.hessian(p)
    pairs = sgdnoise.top_eigenpairs(H, 3, generator=7)
    out = {
        "loss": loss.reshape(1),
        "gradient": grad,
        "hvp": H @ V,
        "hvp_subset": p.hvp(V, indices=torch.tensor([0, 3, 12, 20, 22, 12])),
        "per_sample": p.per_sample_gradients(torch.tensor([22, 1, 9, 1])),
        "per_sample_losses": p.per_sample_losses(),
        "weighted": p.weighted_gradients(torch.randn(2, N, generator=g, dtype=torch.float64))[0],
        "batched_loss": p.batched_loss(p.theta() + 0.1 * V.T),
        "eigenvalues": pairs.eigenvalues,
        "eigenvectors": pairs.eigenvectors,
        "trace_estimate": torch.tensor(float(sgdnoise.trace_estimate(H, 12, generator=2))),
    }
    out |= output_space(p, V) | monitor(p) | padding(p)
    out |= _floats(sgdnoise.escape_indicator(p, 4), "indicator")
    out |= _floats(sgdnoise.escape_indicator(p, 4, num_samples=7, generator=4), "sampled")
    out |= _floats(sgdnoise.alignment(p, 4, k=2), "alignment")
    out |= _floats(sgdnoise.expected_sharpness(p, 0.05, 9, generator=6), "sharpness")
    out |= _floats(sgdnoise.gradient_noise_scale(p), "gns")
    out |= _floats(sgdnoise.gradient_noise_scale(p, method="two_batch", b_small=2, b_big=8), "gns2")
    saved = covariance.MATERIALIZE_LIMIT
    covariance.MATERIALIZE_LIMIT = 0  # the streaming Σ_b: products, trace, diagonal, sampler
    try:
        S = sgdnoise.gradient_noise_covariance(p, 3)
        out |= {
            "stream.products": S @ V,
            "stream.trace": S.trace().reshape(1),
            "stream.diagonal": S.diagonal(),
            "stream.factor": S.sample_factor_product(
                torch.randn(2, N, generator=g, dtype=torch.float64)
            ),
        }
        out |= _floats(sgdnoise.escape_indicator(p, 4), "stream.indicator")
        out |= dynamics(p, "full", steps=5, prefix="stream.")
    finally:
        covariance.MATERIALIZE_LIMIT = saved
    return out


def output_space(p: sgdnoise.Problem, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gauss–Newton products (both routes, all samples and a selection that rank 1 of 3 holds
    none of), output Jacobian products, and sgdnoise.check (every rank's own shard passes)."""
    some = torch.tensor([0, 3, 20, 22, 3])  # ranks of 3 hold [0, 5), [5, 16), [16, 23)
    U = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ok = torch.tensor([float(sgdnoise.check(p).ok)], dtype=torch.float64)
    if p.shard is not None:  # the worst rank's verdict
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return {
        "gn.dense": sgdnoise.gauss_newton(p, dense=True) @ V,
        "gn.free": sgdnoise.gauss_newton(p, dense=False) @ V,
        "gn.dense_some": sgdnoise.gauss_newton(p, indices=some, dense=True) @ V,
        "gn.free_some": sgdnoise.gauss_newton(p, indices=some, dense=False) @ V,
        "output_jvp": p.output_jvp(V[:, :2]),
        "output_jvp_some": p.output_jvp(V[:, 0], indices=some),
        "output_vjp_some": p.output_vjp(U, indices=some),
        "check.ok": ok,
    }


def padding(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """Embedding(padding_idx) with padding tokens on the last ranks' samples only: every rank must
    take the route the padded shard needs (one process: double backward)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(1, 6, (N, 3), generator=gen)
    x[9:, 0] = 0
    y = torch.randint(0, 3, (N,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Tanh(), nn.Flatten(),
                          nn.Linear(12, 3)).double()  # fmt: skip
    lo, hi = (0, N) if p.shard is None else (p.shard.offset, p.shard.offset + p.shard.local)
    q = sgdnoise.Problem(model, F.cross_entropy, x[lo:hi], y[lo:hi])
    V = torch.randn(q.dim, 3, generator=gen, dtype=torch.float64)
    H = sgdnoise.hessian(q)
    return {
        "padding.hvp": H @ V,
        "padding.eigenvalues": sgdnoise.top_eigenpairs(H, 2, generator=1).eigenvalues,
    }


def monitor(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """Every quantity of a Monitor whose probe set is this rank's shard; the number of ranks that
    write its file (rank 0 alone)."""
    import tempfile

    folder = tempfile.mkdtemp()
    mon = sgdnoise.Monitor(p.model, p.loss_fn, (p.inputs, p.targets), every=1, batch_size=4,
                           path=f"{folder}/m.jsonl", sharpness_samples=8, seed=3)  # fmt: skip
    values = mon.step(0)["quantities"]
    writers = torch.tensor([float(mon.path is not None)], dtype=torch.float64)
    if p.shard is not None:
        torch.distributed.all_reduce(writers)
    out = {"monitor.writers": writers}
    for name, entry in values.items():
        for key in ("value", "stderr"):
            if isinstance(entry.get(key), float):
                out[f"monitor.{name}.{key}"] = torch.tensor(entry[key], dtype=torch.float64)
    return out


def dynamics(
    p: sgdnoise.Problem, name: str, steps: int = 20, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """θ after ``steps`` GLD steps of structure ``name`` (from a fixed start), then restored."""
    start = p.theta()
    every = 10 if name.startswith("hessian") else 3  # Lanczos refreshes are the slow part
    opt = sgdnoise.GLD(
        p.model.parameters(),
        0.05,
        noise=name,
        problem=p,
        batch_size=4,
        refresh_every=every,
        generator=11,
        **OPTIONS.get(name, {}),
    )
    losses = [float(opt.step()) for _ in range(steps)]
    out = {f"{prefix}gld.{name}": p.theta(), f"{prefix}gld.{name}.losses": torch.tensor(losses)}
    p.set_theta(start)
    return out


def sgd(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    start = p.theta()
    opt = sgdnoise.MinibatchSGD(p.model.parameters(), 0.1, problem=p, batch_size=5, generator=1)
    for _ in range(20):
        opt.step()
    out = {"sgd": p.theta()}
    p.set_theta(start)
    return out


def float32(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """A float32 twin (with_dtype keeps the group): its first Hessian product runs the one-time
    check against a float64 reference problem, which must stay local to each rank."""
    q = p.with_dtype(torch.float32)
    V = torch.randn(q.dim, 3, generator=torch.Generator().manual_seed(8)).float()
    return {"f32.gradient": q.gradient().double(), "f32.hvp": q.hvp(V).double()}


def everything(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    out = measurements(p) | sgd(p) | float32(p)
    for name in STRUCTURES:
        out |= dynamics(p, name)
    return out


def mismatch(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """A second problem whose model differs on the last rank (one weight nudged): every rank must
    raise the same clear error at construction, not mix two models' numbers."""
    import copy

    model = copy.deepcopy(p.model)
    assert p.shard is not None
    if p.shard.rank == p.shard.world_size - 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-12
    sgdnoise.Problem(model, p.loss_fn, p.inputs, p.targets)
    return {}


def outsider(p: sgdnoise.Problem) -> dict[str, torch.Tensor]:
    """3 ranks, a group of ranks 1 and 2: rank 0 asking for a part of it gets a clear error, the
    members build their problem on it."""
    group = torch.distributed.new_group([1, 2])
    assert p.shard is not None
    if p.shard.rank == 0:
        for call in (
            lambda: sgdnoise.local_range(17, process_group=group),
            lambda: sgdnoise.Problem(p.model, p.loss_fn, p.inputs, p.targets, process_group=group),
        ):
            try:
                call()
            except ValueError as exc:
                assert "is not a member of process_group" in str(exc), exc
            else:
                raise AssertionError("a rank outside the group was not refused")
        return {}
    q = sgdnoise.Problem(p.model, p.loss_fn, p.inputs, p.targets, process_group=group)
    assert q.shard is not None and q.shard.world_size == 2
    q.gradient()
    return {}
