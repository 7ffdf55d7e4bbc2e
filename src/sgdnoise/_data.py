"""Where a :class:`~sgdnoise.Problem` reads its samples from: tensors, a map-style ``Dataset``, or
any re-iterable of ``(inputs, targets)`` batches (a ``DataLoader``, a list of batches, ...).

Inputs may be a tensor, a tuple/list of tensors (the model is called as ``model(*inputs)``) or a
dict of tensors (``model(**inputs)``, as Hugging Face models take them), with the batch on the
first dimension of each; targets likewise. Samples have global indices ``0 … N−1`` in the
source's order, which must be deterministic (checked: a shuffling ``DataLoader`` is refused, and
the first batch of two passes must be identical).

Every source gives the same two operations: ``chunks(indices, size)`` — consecutive pieces
``(x, y, positions)`` of at most ``size`` samples of the selection, in order — and
``take(indices)`` — the rows with those indices, in that order (repeats allowed).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    default_collate,
)

__all__ = ["DataSource", "batch_size_of", "call_model", "make_source", "map_tensors"]

Batch = tuple[Any, Any]


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _leaves(o)]
    return []


def batch_size_of(obj: Any, what: str = "inputs") -> int:
    """The common first dimension of every tensor in ``obj`` (ValueError if they differ)."""
    leaves = _leaves(obj)
    if not leaves:
        raise TypeError(
            f"{what} must be a tensor, or a tuple/list/dict of tensors, with the batch on "
            f"dimension 0; got {type(obj).__name__}"
        )
    sizes = {t.shape[0] if t.ndim else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [list(t.shape) for t in leaves]
        raise ValueError(
            f"every tensor of {what} must have the batch on dimension 0 with one common size, "
            f"got shapes {shapes}"
        )
    size = next(iter(sizes))
    assert size is not None
    return int(size)


def _shapes(obj: Any) -> str:
    shapes = [list(t.shape) for t in _leaves(obj)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def call_model(model: Callable[..., Any], x: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple/list, ``model(**x)`` for a dict."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype if t.is_floating_point() else None)

    return map_tensors(move, obj)


def _rows(obj: Any, sel: torch.Tensor | slice) -> Any:
    return map_tensors(lambda t: t[sel], obj)


def _cat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _split_batch(batch: Any, where: str) -> Batch:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "labels" in batch:  # Hugging Face style
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return rest, batch["labels"]
    raise TypeError(
        f"{where} must yield (inputs, targets) pairs (or dicts with a 'labels' entry); got "
        f"{type(batch).__name__}"
    )


class DataSource(ABC):
    """The samples of a problem (see the module docstring)."""

    num_samples: int
    default_chunk: int | None = None  # full passes: None = all samples at once

    def recast(self, device: torch.device, dtype: torch.dtype) -> DataSource:
        """The same samples, delivered with floating tensors in ``dtype`` on ``device``."""
        other = copy.copy(self)
        other.device, other.dtype = device, dtype  # type: ignore[attr-defined]
        return other

    def one_chunk(self, indices: torch.Tensor | None, size: int) -> bool:
        """Whether :meth:`chunks` with ``size`` gives the selection in one piece."""
        n = self.num_samples if indices is None else int(indices.numel())
        return n <= size

    @abstractmethod
    def take(self, indices: torch.Tensor) -> Batch:
        """The rows ``indices`` (any order, repeats allowed) as one batch."""

    def chunks(
        self, indices: torch.Tensor | None, size: int | None
    ) -> Iterator[tuple[Any, Any, slice]]:
        """Consecutive pieces ``(x, y, positions)`` of at most ``size`` selected samples."""
        n = self.num_samples if indices is None else int(indices.numel())
        size = size or self.default_chunk or n
        for start in range(0, n, size):
            pos = slice(start, min(n, start + size))
            sel = torch.arange(pos.start, pos.stop) if indices is None else indices[pos]
            x, y = self.take(sel)
            yield x, y, pos


class TensorSource(DataSource):
    """Samples held as tensors (or tuples/dicts of tensors) on the model's device."""

    def __init__(self, inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype) -> None:
        n = batch_size_of(inputs, "inputs")
        m = batch_size_of(targets, "targets")
        if n != m:
            raise ValueError(
                "inputs and targets must have the same number of samples along dimension 0, got "
                f"{n} inputs (shape {_shapes(inputs)}) and {m} targets (shape {_shapes(targets)})"
            )
        self.inputs = _to(inputs, device, dtype)
        self.targets = _to(targets, device, dtype)
        self.num_samples = n

    def recast(self, device: torch.device, dtype: torch.dtype) -> DataSource:
        return TensorSource(self.inputs, self.targets, device, dtype)

    def take(self, indices: torch.Tensor) -> Batch:
        indices = indices.to(_leaves(self.inputs)[0].device)
        return _rows(self.inputs, indices), _rows(self.targets, indices)

    def chunks(
        self, indices: torch.Tensor | None, size: int | None
    ) -> Iterator[tuple[Any, Any, slice]]:
        n = self.num_samples if indices is None else int(indices.numel())
        size = size or n
        for start in range(0, n, size):
            pos = slice(start, min(n, start + size))
            if indices is None:  # views, no copy
                yield _rows(self.inputs, pos), _rows(self.targets, pos), pos
            else:
                yield (*self.take(indices[pos]), pos)


class DatasetSource(DataSource):
    """A map-style ``Dataset`` (``len`` and ``dataset[i] -> (x, y)``), fetched chunk by chunk."""

    def __init__(
        self,
        dataset: Any,
        device: torch.device,
        dtype: torch.dtype,
        collate: Callable[[list[Any]], Any] | None = None,
        chunk: int = 256,
    ) -> None:
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.collate = collate or default_collate
        self.device, self.dtype = device, dtype
        self.default_chunk = chunk

    def take(self, indices: torch.Tensor) -> Batch:
        items = [self.dataset[int(i)] for i in indices.tolist()]
        x, y = _split_batch(self.collate(items), "the dataset")
        return _to(x, self.device, self.dtype), _to(y, self.device, self.dtype)


class IterableSource(DataSource):
    """Any re-iterable of ``(inputs, targets)`` batches, read in order; weighted by batch size."""

    def __init__(self, batches: Iterable[Any], device: torch.device, dtype: torch.dtype) -> None:
        self.batches = batches
        self.device, self.dtype = device, dtype
        first = None
        n = self.num_batches = 0
        for batch in batches:
            self.num_batches += 1
            x, y = _split_batch(batch, "the data")
            size = batch_size_of(x, "a batch's inputs")
            if batch_size_of(y, "a batch's targets") != size:
                raise ValueError("every batch must hold as many targets as inputs")
            if first is None:
                first = (x, y)
            n += size
        if first is None:
            raise ValueError("the data set is empty (N = 0); pass at least one sample")
        again = next(iter(batches), None)
        if again is None or not _same(first, _split_batch(again, "the data")):
            raise ValueError(
                "the data must give the same batches in the same order on every pass (sgdnoise "
                "passes over it many times), but two passes started with different batches. "
                "Turn off shuffling and random augmentation (DataLoader(shuffle=False)), or pass "
                "tensors."
            )
        self.num_samples = n

    def _batches(self) -> Iterator[Batch]:
        for batch in self.batches:
            yield _split_batch(batch, "the data")

    def one_chunk(self, indices: torch.Tensor | None, size: int) -> bool:
        if indices is not None:  # gathered by take, in pieces of `size`
            return super().one_chunk(indices, size)
        return self.num_batches == 1 and self.num_samples <= size  # full passes go by batches

    def chunks(
        self, indices: torch.Tensor | None, size: int | None
    ) -> Iterator[tuple[Any, Any, slice]]:
        if indices is not None:
            yield from super().chunks(indices, size)
            return
        start = 0
        for x, y in self._batches():
            b = batch_size_of(x, "a batch's inputs")
            step = size or b
            for s in range(0, b, step):
                e = min(b, s + step)
                pos = slice(start + s, start + e)
                yield (
                    _to(_rows(x, slice(s, e)), self.device, self.dtype),
                    _to(_rows(y, slice(s, e)), self.device, self.dtype),
                    pos,
                )
            start += b

    def take(self, indices: torch.Tensor) -> Batch:
        """One pass over the batches, keeping the requested rows (memory: those rows only)."""
        wanted = indices.to("cpu")
        xs: list[Any] = []
        ys: list[Any] = []
        where: list[torch.Tensor] = []
        start = 0
        for x, y in self._batches():
            b = batch_size_of(x, "a batch's inputs")
            hit = (wanted >= start) & (wanted < start + b)
            if bool(hit.any()):
                local = wanted[hit] - start
                xs.append(_rows(x, local))
                ys.append(_rows(y, local))
                where.append(hit.nonzero().flatten())
            start += b
        order = torch.argsort(torch.cat(where))
        x, y = _rows(_cat(xs), order), _rows(_cat(ys), order)
        return _to(x, self.device, self.dtype), _to(y, self.device, self.dtype)


def _same(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        s.shape == t.shape and s.dtype == t.dtype and torch.equal(s, t)
        for s, t in zip(la, lb, strict=True)
    )


def make_source(inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype) -> DataSource:
    """A :class:`DataSource` for ``Problem(model, loss_fn, inputs, targets)`` or
    ``Problem(model, loss_fn, data)`` (``targets is None``)."""
    if targets is not None:
        return TensorSource(inputs, targets, device, dtype)
    data = inputs
    if isinstance(data, DataSource):
        return data
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler):
            raise ValueError(
                "the DataLoader uses a DistributedSampler, which pads the data set to a multiple "
                "of the number of ranks (repeating samples) and interleaves the ranks' samples: "
                "sgdnoise would count the repeats. Give each rank its contiguous shard instead, "
                "e.g. torch.utils.data.Subset(dataset, range(*sgdnoise.local_range(len(dataset)))) "
                "in a DataLoader with shuffle=False"
            )
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(
                "the DataLoader shuffles (shuffle=True): sgdnoise needs one fixed order of the "
                "samples (it passes over them many times); build it with shuffle=False"
            )
        ds = data.dataset
        if data.batch_size is None and data.batch_sampler is None and hasattr(ds, "__len__"):
            return DatasetSource(ds, device, dtype)  # the loader yields single samples
        if (
            isinstance(data.sampler, SequentialSampler)
            and isinstance(ds, Dataset)
            and hasattr(ds, "__len__")
            and hasattr(ds, "__getitem__")
            and not data.drop_last
        ):
            return DatasetSource(
                ds, device, dtype, collate=data.collate_fn, chunk=data.batch_size or 256
            )
        return IterableSource(data, device, dtype)
    if isinstance(data, Dataset) and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return DatasetSource(data, device, dtype)
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, str, bytes, dict)):
        if iter(data) is data:
            raise TypeError(
                "the data is a one-shot iterator; sgdnoise passes over the data many times: pass a "
                "list of batches, a Dataset or a DataLoader"
            )
        return IterableSource(data, device, dtype)
    raise TypeError(
        "pass inputs and targets (tensors, or tuples/dicts of tensors, batch on dimension 0), or "
        f"one data argument: a Dataset, a DataLoader or a list of (inputs, targets) batches; got "
        f"{type(data).__name__} and no targets"
    )
