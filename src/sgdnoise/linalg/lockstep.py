"""Several matrix-free solvers in lock-step, their operator products batched across solvers.

A solver such as :func:`~sgdnoise.top_eigenpairs` takes its own control-flow decisions (block
size, deflation, restarts, convergence) from the products it receives, so R solvers on R different
operators (the Hessians of R members of a :class:`~sgdnoise.BatchedEngine`, each at its own θ)
cannot be unrolled into one batched solver. :func:`run_lockstep` runs each solver unchanged in a
thread of its own against a proxy operator: a product request blocks the thread, and once every
running solver waits on one, the caller's ``products`` computes all the requests at once (one
batched pass per group of requests with the same number of columns), hands each solver its
result and lets them run to their next request. Each solver sees exactly the products it asked
for, in its own order, so it takes the decisions it takes alone; only the rounding of the batched
products can differ from those of separate ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .operators import LinearOperator

__all__ = ["run_lockstep"]

T = TypeVar("T")

#: ``products(requests)``: ``requests`` is a list of ``(solver index, V [D, k])`` (every solver
#: that is waiting, in index order); the result lists ``A_j V`` ``[D, k]`` in the same order.
Products = Callable[[list[tuple[int, torch.Tensor]]], list[torch.Tensor]]


class _Hub:
    """The meeting point of the solver threads and the thread that computes the products."""

    def __init__(self, running: int) -> None:
        self.cv = threading.Condition()
        self.requests: dict[int, torch.Tensor] = {}
        self.results: dict[int, torch.Tensor | BaseException] = {}
        self.running = running
        self.aborted: BaseException | None = None

    def submit(self, j: int, V: torch.Tensor) -> torch.Tensor:
        with self.cv:
            if self.aborted is not None:
                raise self.aborted
            self.requests[j] = V
            self.cv.notify_all()
            while j not in self.results:
                self.cv.wait()
            out = self.results.pop(j)
        if isinstance(out, BaseException):
            raise out
        return out

    def finished(self) -> None:
        with self.cv:
            self.running -= 1
            self.cv.notify_all()

    def next_round(self) -> list[tuple[int, torch.Tensor]] | None:
        """Every running solver's request, once all of them wait (``None``: all finished)."""
        with self.cv:
            while len(self.requests) < self.running:
                self.cv.wait()
            if self.running == 0:
                return None
            batch = sorted(self.requests.items())
            self.requests.clear()
            return batch

    def abort(self, exc: BaseException) -> None:
        """The calling thread stopped (e.g. Ctrl-C): every waiting or later request raises."""
        with self.cv:
            self.aborted = exc
            for j in self.requests:
                self.results[j] = exc
            self.requests.clear()
            self.cv.notify_all()

    def deliver(self, batch: list[tuple[int, torch.Tensor]], outs: Sequence[Any]) -> None:
        with self.cv:
            for (j, _), out in zip(batch, outs, strict=True):
                self.results[j] = out
            self.cv.notify_all()


class _ProxyOperator(LinearOperator):
    """Solver j's view of its operator: each product waits for the batched round."""

    def __init__(
        self, hub: _Hub, j: int, dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__(dim, dtype, device)
        self.hub, self.j = hub, j

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.hub.submit(self.j, V)


def run_lockstep(
    solvers: Sequence[Callable[[LinearOperator], T]],
    products: Products,
    *,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[T]:
    """Run ``solvers[j](A_j)`` for every j together, the products of all ``A_j`` batched.

    Args:
        solvers: R callables, each given its operator ``A_j`` (a proxy ``[dim, dim]``
            :class:`LinearOperator`) and returning its result; they run in R threads.
        products: computes a round of requests (see :data:`Products`) on the calling thread;
            an exception it raises is raised in every solver of that round.
        dim, dtype, device: the operators' size ``D``, dtype and device.

    Returns:
        The R results, in the order of ``solvers``.

    Raises:
        The first exception (in solver order) that a solver raised, after every solver has
        stopped.
    """
    R = len(solvers)
    hub = _Hub(R)
    results: list[Any] = [None] * R
    errors: list[BaseException | None] = [None] * R

    def work(j: int) -> None:
        try:
            results[j] = solvers[j](_ProxyOperator(hub, j, dim, dtype, device))
        except BaseException as exc:  # re-raised on the calling thread below
            errors[j] = exc
        finally:
            hub.finished()

    threads = [threading.Thread(target=work, args=(j,), daemon=True) for j in range(R)]
    for t in threads:
        t.start()
    try:
        while (batch := hub.next_round()) is not None:
            try:
                outs: list[Any] = list(products(batch))
                if len(outs) != len(batch):
                    raise RuntimeError(f"products returned {len(outs)} results for {len(batch)}")
                for (j, V), out in zip(batch, outs, strict=True):
                    if not isinstance(out, torch.Tensor) or out.shape != V.shape:
                        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out)
                        raise RuntimeError(
                            f"products returned {got} for solver {j}'s request of shape "
                            f"{list(V.shape)}; it must return A_j V of the request's shape"
                        )
            except BaseException as exc:  # every waiting solver raises it and stops
                outs = [exc] * len(batch)
            hub.deliver(batch, outs)
    except BaseException as exc:  # e.g. Ctrl-C while waiting: no solver thread stays blocked
        hub.abort(exc)
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return results
