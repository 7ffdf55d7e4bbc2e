"""A :class:`~sgdnoise.problem.Problem` sharded over the ranks of a ``torch.distributed`` group.

Each rank holds its own shard of the data (sizes may differ); the problem is the concatenation of
the shards in rank order, so sample ``i`` of rank ``r`` has the global index ``offset_r + i`` with
``offset_r = Σ_{q<r} N_q``. Every average over samples is a count-weighted sum of the local chunks,
all-reduced once per pass (one collective per block of products, never per vector); per-sample
matrices are gathered (each rank computes its own rows, the others are zero before one all-reduce,
which is an exact copy). Everything else — θ, Lanczos state, generators — is replicated, so every
rank takes the same decisions and calls the same collectives in the same order.

Without an initialised process group nothing here runs and no ``torch.distributed`` call is made
beyond asking whether one is initialised.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Shard", "local_range", "resolve_group"]


def local_range(n: int, process_group: Any = None) -> tuple[int, int]:
    """``(start, stop)``: this rank's contiguous, near-equal part of ``n`` samples (all of them
    without an initialised group of more than one rank), for building a sharded problem.

    Args:
        n: the number of samples of the whole data set.
        process_group: as in :class:`~sgdnoise.Problem` (``None``: the default group, if any).

    Returns:
        ``(n·r // R, n·(r+1) // R)`` on rank r of R.
    """
    group = resolve_group(process_group)
    if group is None:
        return 0, n
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return n * rank // world, n * (rank + 1) // world


def resolve_group(process_group: Any) -> Any | None:
    """The group a problem shards over: ``None`` → the default group when ``torch.distributed``
    is initialised with more than one rank (else ``None``); ``False`` → ``None`` (a local problem
    on every rank); any other value is used as the group.

    Raises:
        RuntimeError: a group was passed but ``torch.distributed`` is not initialised.
        ValueError: this process is not a member of the group passed.
    """
    if process_group is False:
        return None
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialised or dist.get_world_size() < 2:
            return None
        return dist.group.WORLD
    if not initialised:
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment), "
            "or pass process_group=None for a one-process problem"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group; "
            "build the sharded problem only on the group's ranks (or pass process_group=False "
            "for a one-process problem here)"
        )
    return process_group


class Shard:
    """This rank's place in the concatenated data set, and the collectives of a sharded problem.

    Attributes:
        group: the ``torch.distributed`` process group (``None``: the default group).
        rank, world_size: this rank and the number of ranks in the group.
        sizes: the number of samples of every rank, in rank order.
        offset: global index of this rank's first sample (``Σ`` of the earlier ranks' sizes).
        local: this rank's number of samples. total: N, the sum of all sizes.
        bytes_communicated: bytes all-reduced so far (for benchmarks).
    """

    def __init__(self, group: Any, sizes: list[int]) -> None:
        dist = torch.distributed
        # The default group is named by None: a problem kept past destroy_process_group() then
        # holds no reference to it (a live reference to the destroyed group aborts at exit).
        self.group = None if group is dist.group.WORLD else group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sizes = sizes
        self.offset = sum(sizes[: self.rank])
        self.local = sizes[self.rank]
        self.total = sum(sizes)
        self.bytes_communicated = 0

    @classmethod
    def connect(
        cls, group: Any, local: int, stats: list[float], device: torch.device
    ) -> tuple[Shard, list[list[float]]]:
        """Exchange every rank's sample count and ``stats`` (one all-gather).

        Returns:
            ``(shard, per-rank stats)`` with the stats of every rank in rank order.

        Raises:
            ValueError: a rank holds no samples.
        """
        dist = torch.distributed
        mine = torch.tensor([float(local), *stats], dtype=torch.float64, device=device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        rows = [p.tolist() for p in parts]
        sizes = [int(r[0]) for r in rows]
        if min(sizes) < 1:
            raise ValueError(
                f"every rank must hold at least one sample, got shard sizes {sizes}; give each "
                "rank a non-empty part of the data"
            )
        return cls(group, sizes), [r[1:] for r in rows]

    def __repr__(self) -> str:
        return (
            f"Shard(rank={self.rank}/{self.world_size}, offset={self.offset}, sizes={self.sizes})"
        )

    def count(self, indices: torch.Tensor | None) -> int:
        """Number of selected samples over all ranks (``None``: N)."""
        return self.total if indices is None else int(indices.numel())

    def count_here(self, indices: torch.Tensor | None) -> int:
        """Number of selected samples held by this rank (``None``: all of its samples)."""
        if indices is None:
            return self.local
        mine = (indices >= self.offset) & (indices < self.offset + self.local)
        return int(mine.sum())

    def split(
        self, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
        """``(positions, local)``: where this rank's samples sit in the selection, and their local
        indices (``None``: all of this rank's samples, at positions ``offset : offset + local``)."""
        if indices is None:
            return slice(self.offset, self.offset + self.local), None
        mine = (indices >= self.offset) & (indices < self.offset + self.local)
        positions = mine.nonzero().flatten()
        return positions, indices[positions] - self.offset

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Reduce ``tensor`` over the ranks, in place (one collective; ``op``: a
        ``torch.distributed.ReduceOp``, default the sum); returns it."""
        self.bytes_communicated += tensor.numel() * tensor.element_size()
        dist = torch.distributed
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor

    def gather_rows(
        self,
        positions: torch.Tensor | slice,
        n: int,
        parts: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Place this rank's rows of each part (``[n_local, ...]``) at ``positions`` of ``n`` rows
        and sum over the ranks: every rank gets the full ``[n, ...]`` tensors (an exact copy; the
        other ranks contribute zeros). One collective for all parts."""
        widths = [math.prod(p.shape[1:]) for p in parts]
        ref = parts[0]
        buf = torch.zeros(n, sum(widths), dtype=ref.dtype, device=ref.device)
        start = 0
        for p, w in zip(parts, widths, strict=True):
            buf[positions, start : start + w] = p.reshape(p.shape[0], w).to(ref.dtype)
            start += w
        self.all_reduce(buf)
        out, start = [], 0
        for p, w in zip(parts, widths, strict=True):
            out.append(buf[:, start : start + w].reshape(n, *p.shape[1:]).to(p.dtype))
            start += w
        return out
