"""Problems built from data sets: a DataLoader, a map-style Dataset, a list of batches, and tuple
or dict inputs give the same numbers as the tensor form on the same data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import sgdnoise
from conftest import make_problem


class _Pairs(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _sources(ref: sgdnoise.Problem) -> dict[str, object]:
    x, y = ref.inputs, ref.targets
    return {
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False),
        "dataloader-drop-none-custom-sampler": DataLoader(
            TensorDataset(x, y),
            batch_sampler=[list(range(i, min(23, i + 5))) for i in range(0, 23, 5)],
        ),
        "dataset": _Pairs(x, y),
        "batches": [(x[i : i + 6], y[i : i + 6]) for i in range(0, 23, 6)],
    }


@pytest.mark.parametrize(
    "source", ["dataloader", "dataloader-drop-none-custom-sampler", "dataset", "batches"]
)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_a_data_set_problem_equals_the_tensor_problem(source: str, chunk_size: int | None) -> None:
    ref = make_problem("cnn", n=23)
    data = _sources(ref)[source]
    p = sgdnoise.Problem(ref.model, ref.loss_fn, data, chunk_size=chunk_size)
    assert p.num_samples == 23
    close = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.loss(), ref.loss(), **close)
    torch.testing.assert_close(p.gradient(), ref.gradient(), **close)
    torch.testing.assert_close(p.per_sample_gradients(), ref.per_sample_gradients(), **close)
    V = torch.randn(p.dim, 2, generator=torch.Generator().manual_seed(0), dtype=p.dtype)
    torch.testing.assert_close(p.hvp(V), ref.hvp(V), **close)
    idx = torch.tensor([5, 0, 22, 5])
    torch.testing.assert_close(p.gradient(indices=idx), ref.gradient(indices=idx), **close)
    torch.testing.assert_close(
        sgdnoise.gradient_noise_covariance(p, 4).trace(),
        sgdnoise.gradient_noise_covariance(ref, 4).trace(),
        **close,
    )
    a = sgdnoise.escape_indicator(p, 4, num_samples=6, generator=3)
    b = sgdnoise.escape_indicator(ref, 4, num_samples=6, generator=3)
    assert a.tr_HS == pytest.approx(b.tr_HS, rel=1e-10)
    with pytest.raises(AttributeError, match="take"):
        _ = p.inputs if source != "tensor" else None


class _KwModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, pixels: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.a(pixels) + self.b(extra)))


def test_tuple_and_dict_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    model = _KwModel().double()
    x1 = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    x2 = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    as_tuple = sgdnoise.Problem(model, F.cross_entropy, (x1, x2), y)
    as_dict = sgdnoise.Problem(model, F.cross_entropy, {"pixels": x1, "extra": x2}, y)
    rows = [
        torch.autograd.grad(
            F.cross_entropy(model(x1[i : i + 1], x2[i : i + 1]), y[i : i + 1]),
            list(model.parameters()),
        )
        for i in range(9)
    ]
    G = torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows])
    for p in (as_tuple, as_dict):
        torch.testing.assert_close(p.per_sample_gradients(), G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.gradient(), G.mean(0), rtol=1e-12, atol=1e-14)
    hf = [
        ({"pixels": x1[i : i + 4], "extra": x2[i : i + 4], "labels": y[i : i + 4]})
        for i in (0, 4, 8)
    ]
    p = sgdnoise.Problem(model, F.cross_entropy, hf)  # dict batches with a "labels" entry
    torch.testing.assert_close(p.gradient(), G.mean(0), rtol=1e-12, atol=1e-14)


def test_data_sets_in_a_changing_order_are_refused() -> None:
    ref = make_problem("mlp", n=10)
    x, y = ref.inputs, ref.targets
    with pytest.raises(ValueError, match="shuffle=False"):
        sgdnoise.Problem(ref.model, ref.loss_fn, DataLoader(TensorDataset(x, y), shuffle=True))

    class Reshuffles:
        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(0)

        def __iter__(self):
            perm = torch.randperm(10, generator=self.gen)
            return iter([(x[perm[:5]], y[perm[:5]]), (x[perm[5:]], y[perm[5:]])])

    with pytest.raises(ValueError, match="same batches in the same order on every pass"):
        sgdnoise.Problem(ref.model, ref.loss_fn, Reshuffles())
    # a DistributedSampler pads to a multiple of the ranks (repeats) and interleaves them
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=3, rank=0, shuffle=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=sampler)
    with pytest.raises(ValueError, match="DistributedSampler.*local_range"):
        sgdnoise.Problem(ref.model, ref.loss_fn, loader)
    with pytest.raises(TypeError, match="one-shot iterator"):
        sgdnoise.Problem(ref.model, ref.loss_fn, iter([(x, y)]))
    with pytest.raises(ValueError, match="empty"):
        sgdnoise.Problem(ref.model, ref.loss_fn, [])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs"):
        sgdnoise.Problem(ref.model, ref.loss_fn, [x])
    with pytest.raises(ValueError, match=r"same number of samples.*\[5, 4\].*\[4\]"):
        sgdnoise.Problem(ref.model, ref.loss_fn, x[:5], y[:4])
