"""Parameter blocks (``Problem(params=...)``) and the per-layer table against dense references."""

from __future__ import annotations

import pytest
import torch

import sgdnoise
from conftest import make_problem
from reference import dense_hessian, dense_sigma, loop_per_sample_gradients


def _offsets(problem: sgdnoise.Problem) -> dict[str, slice]:
    out, start = {}, 0
    for name, size in zip(problem.param_names, problem.param_numels, strict=True):
        out[name] = slice(start, start + size)
        start += size
    return out


@pytest.mark.parametrize("spec", ["0.*", ["2.weight", "0.bias"], "module"])
def test_a_block_is_the_submatrix_of_the_whole_model(spec: object) -> None:
    full = make_problem("mlp")
    if spec == "module":
        spec = full.model[2]
    sub = full.restrict(spec)  # type: ignore[arg-type]
    where = _offsets(full)
    cols = torch.cat([torch.arange(where[n].start, where[n].stop) for n in sub.param_names])
    H, G = dense_hessian(full), loop_per_sample_gradients(full)
    S = dense_sigma(full, b=3)
    torch.testing.assert_close(sgdnoise.hessian(sub).to_dense(), H[cols][:, cols])
    torch.testing.assert_close(sub.per_sample_gradients(), G[:, cols])
    torch.testing.assert_close(
        sgdnoise.gradient_noise_covariance(sub, 3).to_dense(), S[cols][:, cols]
    )
    torch.testing.assert_close(sub.gradient(), G.mean(0)[cols])
    # θ keeps the model's order, and parameters outside the block stay as they were
    assert sub.param_names == [n for n in full.param_names if n in sub.param_names]
    before = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    opt = sgdnoise.make_optimizer("gd", sub, 0.1)
    opt.step()
    for n, p in full.model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in sub.param_names)


def test_bad_blocks_are_refused() -> None:
    full = make_problem("mlp")
    with pytest.raises(ValueError, match="pattern 'conv.*' selects no trainable parameter"):
        full.restrict("conv.*")
    with pytest.raises(ValueError, match="params is empty"):
        full.restrict([])
    with pytest.raises(TypeError, match="params entries must be modules, name patterns"):
        full.restrict([3])  # type: ignore[list-item]


def test_the_layer_table_adds_up_to_the_whole_model(kind: str) -> None:
    problem = make_problem(kind)
    table = sgdnoise.by_layer(problem, batch_size=4)
    H, S = dense_hessian(problem), dense_sigma(problem, b=4)
    assert table.total("tr_H") == pytest.approx(float(H.trace()), rel=1e-9)
    assert table.total("tr_S") == pytest.approx(float(S.trace()), rel=1e-9)
    where = _offsets(problem)
    for row in table.rows:
        cols = torch.cat([torch.arange(where[n].start, where[n].stop) for n in row["params"]])
        Hb, Sb = H[cols][:, cols], S[cols][:, cols]
        assert row["tr_HS"] == pytest.approx(float((Hb @ Sb).trace()), rel=1e-9)
        assert row["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(Hb)[-1]), rel=1e-5)
    assert table.rows[0]["layer"] in ("0", "conv")
    assert "| layer | type | D |" in str(table)
