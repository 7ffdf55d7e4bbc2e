"""Faults found by trying sgdnoise as a new user would; each is now refused or right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdnoise
from conftest import make_problem
from reference import loop_per_sample_gradients
from sgdnoise.linalg import DenseOperator


def test_a_boolean_mask_selects_samples_and_float_indices_are_refused() -> None:
    problem = make_problem("mlp", n=6)
    mask = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(
        problem.per_sample_gradients(mask), problem.per_sample_gradients([0, 2, 5])
    )
    torch.testing.assert_close(
        sgdnoise.hessian(problem, indices=mask).to_dense(),
        sgdnoise.hessian(problem, indices=[0, 2, 5]).to_dense(),
    )
    with pytest.raises(ValueError, match=r"boolean mask of samples must have shape \[N\] = \[6\]"):
        problem.gradient(indices=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="must be integers"):
        problem.gradient(indices=torch.tensor([0.9, 2.7]))


def test_hutchpp_needs_two_residual_probes() -> None:
    A = DenseOperator(torch.diag(torch.linspace(1, 2, 50, dtype=torch.float64)))
    with pytest.raises(ValueError, match="hutch\\+\\+ needs num_matvecs >= 4"):
        sgdnoise.trace_estimate(A, 3, generator=0)
    # unbiased at the smallest budget: the mean of many estimates is the trace
    est = [sgdnoise.trace_estimate(A, 4, generator=s).value for s in range(400)]
    mean = sum(est) / len(est)
    se = (sum((e - mean) ** 2 for e in est) / (len(est) - 1) / len(est)) ** 0.5
    assert abs(mean - 75.0) <= 4 * se


def test_a_non_symmetric_dense_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a symmetric matrix"):
        DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64))


def test_a_model_changed_after_the_problem_was_built_is_named() -> None:
    problem = make_problem("mlp")
    problem.model.float()
    with pytest.raises(RuntimeError, match=r"now torch.float32 .* build a new Problem"):
        problem.gradient()


def test_a_meta_model_is_refused() -> None:
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="'meta' device"):
        sgdnoise.Problem(
            model, F.cross_entropy, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
        )


def test_a_parameter_changed_in_place_inside_forward_is_explained() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2)).double()
    x, y = torch.randint(0, 6, (5, 2), generator=gen), torch.randint(0, 2, (5,), generator=gen)
    with pytest.raises(RuntimeError, match="in place inside forward.*max_norm"):
        problem = sgdnoise.Problem(model, F.cross_entropy, x, y)
        problem.gradient()


def test_per_sample_gradients_fall_back_to_plain_autograd() -> None:
    # packed sequences: torch.func cannot take their gradient, ordinary backward passes can
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(2, 3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lengths = (x[:, :, 0] != 0).sum(1).clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths, batch_first=True, enforce_sorted=False
            )
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 2, generator=gen, dtype=torch.float64)
    x[1, 2:] = 0
    problem = sgdnoise.Problem(
        Packed().double(), F.cross_entropy, x, torch.randint(0, 2, (5,), generator=gen)
    )
    torch.testing.assert_close(
        problem.per_sample_gradients(), loop_per_sample_gradients(problem), rtol=1e-10, atol=1e-12
    )


def test_tiny_budgets_and_booleans_are_refused_clearly() -> None:
    from sgdnoise.problem import parse_memory

    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_memory(0.5)
    problem = make_problem("mlp")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sgdnoise.Problem(
            problem.model, problem.loss_fn, problem.inputs, problem.targets, chunk_size=True
        )
    tiny = sgdnoise.Problem(
        problem.model, problem.loss_fn, problem.inputs, problem.targets, memory_budget=8
    )
    with pytest.raises(
        MemoryError, match=r"needs about \d+(\.\d)? (bytes|KiB) .* budget of 8 bytes"
    ):
        tiny.gradient()


def _spectrum(d: torch.Tensor) -> DenseOperator:
    Q, _ = torch.linalg.qr(
        torch.randn(len(d), len(d), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    return DenseOperator(Q @ torch.diag(d) @ Q.T), Q


def test_lanczos_is_not_trapped_by_a_warm_start_inside_an_invariant_subspace() -> None:
    op, Q = _spectrum(torch.arange(60, dtype=torch.float64))
    pairs = sgdnoise.top_eigenpairs(op, 1, v0=Q[:, 5], generator=0)
    assert pairs.converged and float(pairs.eigenvalues[0]) == pytest.approx(59.0, rel=1e-8)
    pairs = sgdnoise.top_eigenpairs(op, 3, v0=Q[:, [5, 6, 7]], generator=0)
    torch.testing.assert_close(
        pairs.eigenvalues, torch.tensor([59.0, 58.0, 57.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("mult,k,block", [(4, 5, 1), (10, 12, None), (10, 10, None)])
def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue(
    mult: int, k: int, block: int | None
) -> None:
    d = torch.tensor([5.0] * mult + [1.0] * (60 - mult), dtype=torch.float64)
    op, _ = _spectrum(d)
    if block is None and k > mult > 8:  # above the default block's cap of 8: it says so
        with pytest.warns(RuntimeWarning, match="grown to its cap of 8"):
            pairs = sgdnoise.top_eigenpairs(op, k, generator=0, block_size=block)
    else:
        pairs = sgdnoise.top_eigenpairs(op, k, generator=0, block_size=block)
    torch.testing.assert_close(pairs.eigenvalues, d[:k])


@pytest.mark.parametrize("mult", [2, 3])
def test_the_default_block_grows_where_an_eigenvalue_shows_as_often_as_it_has_columns(
    mult: int,
) -> None:
    # every eigenvalue `mult` times (D = 60·mult, no early invariant subspace to refill from):
    # the default block starts at 2 columns, which see at most 2 copies of one eigenvalue
    d = torch.linspace(10, 1, 60, dtype=torch.float64).repeat_interleave(mult)
    op, _ = _spectrum(d)
    pairs = sgdnoise.top_eigenpairs(op, 5, generator=0)
    torch.testing.assert_close(pairs.eigenvalues, d[:5])
    assert pairs.block_size > mult  # grew past the multiplicity
    # what the growth prevents: a fixed block below the multiplicity misses copies, silently
    if mult - 1 >= 2:  # a fixed block of 2 or more says it may be short of copies
        with pytest.warns(RuntimeWarning, match=f"came out {mult - 1} times"):
            fixed = sgdnoise.top_eigenpairs(op, 5, generator=0, block_size=mult - 1)
    else:
        fixed = sgdnoise.top_eigenpairs(op, 5, generator=0, block_size=mult - 1)
    assert fixed.converged and not torch.allclose(fixed.eigenvalues, d[:5], rtol=1e-6)
    # a spectrum without repeats keeps the 2-column block
    distinct = sgdnoise.top_eigenpairs(_spectrum(d.unique().flip(0))[0], 5, generator=0)
    assert distinct.block_size == 2


def test_expected_sharpness_of_a_16_bit_model_is_that_of_its_float32_copy() -> None:
    import copy

    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    x, y = (
        torch.randn(30, 4, generator=gen).to(torch.bfloat16),
        torch.randint(0, 3, (30,), generator=gen),
    )
    low = sgdnoise.Problem(model, F.cross_entropy, x, y)
    f32 = sgdnoise.Problem(copy.deepcopy(model).float(), F.cross_entropy, x.float(), y)
    a = sgdnoise.expected_sharpness(low, 1e-3, 64, generator=0)
    b = sgdnoise.expected_sharpness(f32, 1e-3, 64, generator=0)
    assert a == b
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
