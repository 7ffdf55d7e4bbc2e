"""A training monitor: the noise-structure measures of sgdnoise, every K steps of any training loop.

:class:`Monitor` holds a fixed *probe set* and, every ``every`` steps, measures at the model's
current parameters: the escape indicator Tr(HΣ_b) and its isotropic equivalent Tr(HΣ̄), the top
Hessian eigenvalue λ_max (Lanczos warm-started from the previous call's eigenvector), Tr H,
Tr Σ_b, the gradient noise scale B_simple, Proposition 1's alignment ``a`` and the expected
sharpness — each with its wall-clock cost and, where the quantity has one, its standard error.
Each measurement is appended to a JSON-lines file (and written as TensorBoard scalars when the
``tensorboard`` extra is installed and ``tensorboard_dir`` is given); ``sgdnoise plot-monitor
FILE`` draws every quantity against the step, reading the file only.

Example (a 20-step training loop; ``sgdnoise plot-monitor monitor.jsonl --out monitor.png`` then
draws ``docs/monitor.png``)::

    import torch
    import torch.nn.functional as F
    import sgdnoise

    torch.manual_seed(0)  # the model's initialisation (the monitor never uses the global RNG)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)  # a learnable 3-class problem
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = sgdnoise.Monitor(
        model, F.cross_entropy, (x[:64], y[:64]),  # the fixed probe set
        every=2, batch_size=32, path="monitor.jsonl", generator=0,
    )
    for step in range(20):
        monitor.step(step)  # measures at steps 0, 2, 4, ... before the update
        idx = torch.randint(0, 1024, (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    monitor.close()
    print({name: q["value"] for name, q in monitor.records[-1]["quantities"].items()})

Guarantees: a measurement never changes the model's parameters or buffers, the ``.grad`` of its
parameters, PyTorch's global random state, or the train/eval flag of any module. Models with
dropout or BatchNorm are **measured in eval mode** (per-sample gradients and Hessian products are
ill-defined in training mode: BatchNorm couples the samples and updates its running statistics,
dropout is random); every module's own flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._utils import is_writer, resolve_generator
from .linalg import batch_scale, gradient_noise_covariance, hessian, top_eigenpairs
from .measures import alignment, escape_indicator, expected_sharpness, hessian_trace
from .noise_scale import gradient_noise_scale
from .problem import Problem

__all__ = ["QUANTITIES", "Monitor", "read_monitor"]

_Gen = Callable[[str], torch.Generator]
_Put = Callable[..., None]

#: The quantities a monitor can measure, with their meaning (the keys of a record's
#: ``"quantities"``).
QUANTITIES: dict[str, str] = {
    "loss": "probe loss L(θ)",
    "tr_HS": "Tr(H Σ_b), the escape indicator (exact, or sampled with num_samples)",
    "tr_HS_iso": "Tr(H Σ̄) = Tr H · Tr Σ_b / D, its isotropic equivalent",
    "lambda_max": "largest Hessian eigenvalue (Lanczos, warm-started from the last call)",
    "tr_H": "Tr H (exact up to D = 2048, Hutch++ above or with a sampled indicator)",
    "tr_S": "Tr Σ_b (exact)",
    "b_simple": "gradient noise scale B_simple = Tr Σ₁ / ‖∇L‖² (exact)",
    "alignment": "Proposition 1's alignment a = u₁ᵀΣ_b u₁ · Tr H / (λ₁ Tr Σ_b)",
    "sharpness": "expected sharpness E[L(θ+ν)] − L(θ), ν ~ N(0, σ² I)",
}

# Each quantity draws its randomness from its own generator, seeded ``seed + offset``.
_OFFSET = {name: i for i, name in enumerate(QUANTITIES)}


def check_quantities(quantities: Sequence[str] | str | None) -> list[str]:
    """Validated quantity names, in the order given (duplicates dropped; ``None``: all)."""
    if quantities is None:
        return list(QUANTITIES)
    names = [quantities] if isinstance(quantities, str) else list(quantities)
    if not names:
        raise ValueError(f"quantities is empty; choose from {', '.join(QUANTITIES)}")
    unknown = [n for n in names if n not in QUANTITIES]
    if unknown:
        raise ValueError(
            f"unknown quantit{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(n) for n in unknown)}; valid: {', '.join(QUANTITIES)}"
        )
    return list(dict.fromkeys(names))


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: non-finite numbers are written as null."""
    x = float(x)
    return x if math.isfinite(x) else None


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode and gradients enabled for the measurement; every module's flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _split_probe(probe_data: Any, probe_targets: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` for :class:`Problem`: a pair ``(x, y)`` is split, a data set is not."""
    if probe_targets is not None:
        return probe_data, probe_targets
    if (
        isinstance(probe_data, tuple)
        and len(probe_data) == 2
        and isinstance(probe_data[1], torch.Tensor)
    ):
        return probe_data[0], probe_data[1]
    return probe_data, None


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Monitor:
    """Measure SGD's noise structure on a fixed probe set every ``every`` training steps.

    Call :meth:`step` once per training step from any loop; at steps that are multiples of
    ``every`` it measures at the model's current parameters and appends one JSON line to
    ``path``::

        {"step": 40, "time": 1764490000.1, "seconds": 1.93, "seed": 1234, "num_probe": 128,
         "dim": 771, "batch_size": 32,
         "quantities": {"tr_HS": {"value": 0.021, "stderr": 0.0, "seconds": 0.61,
                                  "source": "escape_indicator", "exact": true, "ratio": 1.7},
                        "lambda_max": {"value": 3.2, "stderr": null, "seconds": 0.2, ...}, ...}}

    ``value`` is the quantity, ``stderr`` its standard error (0.0 when computed exactly, null for
    quantities without one: λ_max, alignment), ``seconds`` the wall-clock cost of the call that
    produced it (``source``; Tr(HΣ̄), and Tr H / Tr Σ_b when the indicator is measured, come
    from the same :func:`~sgdnoise.escape_indicator` call and share its cost), and the record's
    ``seconds`` the cost of the whole measurement. Non-finite numbers are written as null.
    The quantities are those of :data:`QUANTITIES` and follow the README's conventions
    (Σ_b is the gradient-level covariance of a size-b mini-batch gradient, divisor N).

    Args:
        model: the model being trained (its trainable parameters define θ).
        loss_fn: ``loss_fn(outputs, targets)`` → the *mean* loss of a batch.
        probe_data: the fixed probe set: a pair ``(inputs, targets)`` of tensors, or anything
            :class:`~sgdnoise.Problem` takes as a data set (a ``Dataset``, a non-shuffling
            ``DataLoader``, a list of ``(inputs, targets)`` batches); or inputs alone with
            ``probe_targets``.
        probe_targets: targets when ``probe_data`` holds the inputs only.
        every: measure when ``step % every == 0``.
        quantities: names from :data:`QUANTITIES` (default: all).
        batch_size: the mini-batch size b of the SGD noise Σ_b.
        path: the JSON-lines file (``None``: keep the records in :attr:`records` only).
        append: keep the lines already in ``path`` (resuming a run); by default the file is
            started afresh when the monitor is created.
        seed, generator: the generator wins (a ``torch.Generator``, advanced, or an int seed);
            else a fresh generator seeded with ``seed`` (default 0). Each measurement draws one
            seed from it
            (recorded as ``"seed"``); quantity q uses a fresh generator seeded ``seed + i_q``
            (``i_q`` its position in :data:`QUANTITIES`), so a record can be reproduced by
            direct calls. A generator passed here is advanced; the global RNG is never used.
        num_samples: ``None``: exact Tr(HΣ_b) (one Hessian product per probe sample); an integer
            m: the unbiased sampled estimate from m probe samples, with its standard error.
        alignment_k: k of :func:`~sgdnoise.alignment` (the reported ``a`` uses the top
            eigenpair; ``overlap`` uses the top-k eigenspaces).
        sigma, sharpness_samples: σ and the number of draws of the expected sharpness.
        eig_tol: Lanczos tolerance of λ_max (default: the dtype's, see
            :func:`~sgdnoise.top_eigenpairs`); a λ_max that did not converge is recorded with
            ``"converged": false`` and warned about once.
        replacement: whether SGD's mini-batches are drawn with replacement (scales Σ_b).
        params: restrict θ to a block of parameters (see :class:`~sgdnoise.Problem`).
        chunk_size: largest number of probe samples processed at once.
        tensorboard_dir: also write TensorBoard scalars (``sgdnoise/<quantity>`` and
            ``sgdnoise_seconds/<quantity>``) there; needs ``pip install 'sgdnoise[tensorboard]'``.
        process_group: as in :class:`~sgdnoise.Problem`: under ``torchrun`` (an initialised
            group of several ranks) the probe set is *sharded* by default — each rank passes its
            own part of it and every rank calls :meth:`step` at the same steps; rank 0 alone
            writes ``path`` and TensorBoard. ``False``: every rank measures its own probe set
            alone (no collectives; rank 0 still the only writer).

    Attributes:
        records: every measurement made, as written to ``path``.
        problem: the :class:`~sgdnoise.Problem` on the probe set.

    Raises:
        ValueError: an unknown quantity (the message lists the valid ones), a non-positive
            ``every``, ``batch_size`` outside [1, N] (N: the probe set's size), or
            ``alignment_k`` above N − 1.
        ImportError: ``tensorboard_dir`` given without the ``tensorboard`` package.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        probe_data: Any,
        probe_targets: Any = None,
        *,
        every: int = 10,
        quantities: Sequence[str] | str | None = None,
        batch_size: int = 32,
        path: str | os.PathLike[str] | None = "monitor.jsonl",
        append: bool = False,
        seed: int | None = 0,
        generator: torch.Generator | int | None = None,
        num_samples: int | None = None,
        alignment_k: int = 1,
        sigma: float = 0.01,
        sharpness_samples: int = 100,
        eig_tol: float | None = None,
        replacement: bool = True,
        params: Any = None,
        chunk_size: int | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        process_group: Any = None,
    ) -> None:
        self.every = _positive_int("every", every)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.quantities = check_quantities(quantities)
        self.alignment_k = _positive_int("alignment_k", alignment_k)
        self.sharpness_samples = _positive_int("sharpness_samples", sharpness_samples)
        if "sharpness" in self.quantities and self.sharpness_samples < 2:
            raise ValueError(f"sharpness_samples must be >= 2, got {sharpness_samples}")
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)
        self.num_samples = num_samples
        self.eig_tol = eig_tol
        self.replacement = bool(replacement)
        self._generator = resolve_generator(seed, generator)
        inputs, targets = _split_probe(probe_data, probe_targets)
        with _measuring(model):
            self.problem = Problem(
                model, loss_fn, inputs, targets, chunk_size=chunk_size, params=params,
                process_group=process_group,
            )  # fmt: skip
        N = self.problem.num_samples
        batch_scale(N, self.batch_size, self.replacement)  # b outside [1, N]: an error now
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int)
        ):
            raise ValueError(f"num_samples must be None (exact) or an integer, got {num_samples!r}")
        if num_samples is not None and not 2 <= num_samples <= N:
            raise ValueError(
                f"num_samples must be None (exact) or in [2, N] = [2, {N}] (the probe set's "
                f"size), got {num_samples}"
            )
        if "alignment" in self.quantities and self.alignment_k > N - 1:
            raise ValueError(
                f"alignment_k = {self.alignment_k} exceeds N − 1 = {N - 1} (the rank bound of Σ on "
                f"a probe set of {N} samples); pass a smaller alignment_k or a larger probe set"
            )
        self.model = model
        self.records: list[dict[str, Any]] = []
        self._eigenvector: torch.Tensor | None = None
        self._warned = False
        self.path = None if path is None or not is_writer() else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")
        self._writer: Any = None
        if tensorboard_dir is not None and is_writer():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "tensorboard_dir needs the tensorboard package "
                    "(pip install 'sgdnoise[tensorboard]'); it is not importable here"
                ) from exc
            self._writer = SummaryWriter(log_dir=str(tensorboard_dir))

    # ------------------------------------------------------------------ public
    @property
    def eigenvector(self) -> torch.Tensor | None:
        """The top Hessian eigenvector of the last λ_max measurement (the next warm start)."""
        return self._eigenvector

    def step(self, step: int) -> dict[str, Any] | None:
        """Measure if ``step`` is a multiple of ``every``; returns the record, or ``None``."""
        try:
            step = operator.index(step)  # ints, numpy integers, 0-d integer tensors
        except TypeError:
            step = -1
        if isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if step % self.every:
            return None
        return self.measure(step)

    def measure(
        self, step: int, *, on_done: Callable[[str, float, int, int], None] | None = None
    ) -> dict[str, Any]:
        """Measure now (whatever ``every`` says), record and return the record.

        ``on_done(source, seconds, done, total)`` is called after each computation (progress).
        """
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator))
        t0 = time.perf_counter()
        with _measuring(self.model):
            values = self._compute(seed, on_done)
        record = {
            "step": int(step),
            "time": time.time(),
            "seconds": time.perf_counter() - t0,
            "seed": seed,
            "num_probe": self.problem.num_samples,
            "dim": self.problem.dim,
            "batch_size": self.batch_size,
            "quantities": values,
        }
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, entry in values.items():
                if entry["value"] is not None:
                    self._writer.add_scalar(f"sgdnoise/{name}", entry["value"], step)
                self._writer.add_scalar(f"sgdnoise_seconds/{name}", entry["seconds"], step)
            self._writer.flush()
        return record

    def close(self) -> None:
        """Close the TensorBoard writer (the JSON-lines file is closed after every record)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(every={self.every}, quantities={self.quantities}, "
            f"batch_size={self.batch_size}, probe N={self.problem.num_samples}, "
            f"D={self.problem.dim}, path={str(self.path) if self.path else None!r})"
        )

    # ------------------------------------------------------------------ computation
    def plan(self) -> list[str]:
        """The computations one measurement makes, in order (quantities computed together, such
        as the four of the escape indicator, share one)."""
        q = set(self.quantities)
        plan = []
        if "loss" in q:
            plan.append("loss")
        indicator = bool(q & {"tr_HS", "tr_HS_iso"})
        if indicator:
            plan.append("escape_indicator")
        if "tr_H" in q and not indicator:
            plan.append("hessian_trace")
        if "tr_S" in q and not indicator:
            plan.append("noise_trace")
        for name in ("lambda_max", "b_simple", "alignment", "sharpness"):
            if name in q:
                plan.append(name)
        return plan

    _plan = plan  # the earlier private name

    def _compute(
        self, seed: int, on_done: Callable[[str, float, int, int], None] | None
    ) -> dict[str, dict[str, Any]]:
        def gen(name: str) -> torch.Generator:
            return torch.Generator().manual_seed(seed + _OFFSET[name])

        out: dict[str, dict[str, Any]] = {}

        def put(
            name: str, value: float, stderr: float | None, sec: float, source: str, **extra: Any
        ) -> None:
            if name in self.quantities:
                out[name] = {
                    "value": _finite(value),
                    "stderr": None if stderr is None else _finite(stderr),
                    "seconds": sec,
                    "source": source,
                    **extra,
                }

        plan = self.plan()
        for i, source in enumerate(plan, 1):
            t0 = time.perf_counter()
            getattr(self, f"_src_{source}")(gen, put, t0)
            if on_done is not None:
                on_done(source, time.perf_counter() - t0, i, len(plan))
        return {name: out[name] for name in self.quantities}

    # One method per source (called by _compute in the order of _plan).
    def _src_loss(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem = self.problem
        source = "loss"
        value = float(problem.loss())
        sec = time.perf_counter() - t0
        put("loss", value, None, sec, source)

    def _src_escape_indicator(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem, b = self.problem, self.batch_size
        source = "escape_indicator"
        ind = escape_indicator(
            problem,
            b,
            num_samples=self.num_samples,
            generator=gen("tr_HS"),
            replacement=self.replacement,
        )
        sec = time.perf_counter() - t0
        iso_se = ind.tr_H_stderr * ind.tr_S / ind.dim
        put(
            "tr_HS",
            ind.tr_HS,
            ind.stderr,
            sec,
            source,
            exact=ind.exact,
            ratio=_finite(ind.ratio),
        )
        put("tr_HS_iso", ind.tr_HS_iso, iso_se, sec, source, exact=ind.tr_H_exact)
        put("tr_H", ind.tr_H, ind.tr_H_stderr, sec, source, exact=ind.tr_H_exact)
        put("tr_S", ind.tr_S, 0.0, sec, source, exact=True)

    def _src_hessian_trace(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem = self.problem
        source = "hessian_trace"
        tr, se, exact = hessian_trace(hessian(problem), generator=gen("tr_H"))
        put("tr_H", tr, se, time.perf_counter() - t0, source, exact=exact)

    def _src_noise_trace(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem, b = self.problem, self.batch_size
        source = "noise_trace"
        cov = gradient_noise_covariance(problem, b, self.replacement)
        value = float(cov.trace())
        put("tr_S", value, 0.0, time.perf_counter() - t0, source, exact=True)

    def _src_lambda_max(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem = self.problem
        source = "lambda_max"
        warm = self._eigenvector is not None
        pairs = top_eigenpairs(
            hessian(problem),
            1,
            tol=self.eig_tol,
            generator=gen("lambda_max"),
            v0=self._eigenvector,
            on_nonconvergence="ignore",
        )
        sec = time.perf_counter() - t0
        self._eigenvector = pairs.eigenvectors[:, 0].detach().clone()
        if not pairs.converged and not self._warned:
            self._warned = True
            warnings.warn(
                f"λ_max did not converge to tol={pairs.tol:g} within "
                f"{pairs.num_matvecs} products (recorded with converged=false); "
                "pass a larger eig_tol",
                RuntimeWarning,
                stacklevel=3,
            )
        put(
            "lambda_max",
            float(pairs.eigenvalues[0]),
            None,
            sec,
            source,
            residual=float(pairs.residuals[0]),
            num_matvecs=int(pairs.num_matvecs),
            converged=bool(pairs.converged),
            warm_start=warm,
        )

    def _src_b_simple(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem = self.problem
        source = "b_simple"
        gns = gradient_noise_scale(problem)
        sec = time.perf_counter() - t0
        put(
            "b_simple",
            gns.b_simple,
            gns.stderr,
            sec,
            source,
            tr_sigma=_finite(gns.tr_sigma),
            grad_norm_sq=_finite(gns.grad_norm_sq),
        )

    def _src_alignment(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem, b = self.problem, self.batch_size
        source = "alignment"
        al = alignment(
            problem,
            b,
            self.alignment_k,
            generator=gen("alignment"),
            replacement=self.replacement,
        )
        sec = time.perf_counter() - t0
        put(
            "alignment",
            al.a,
            None if al.tr_H_exact else _finite(al.a_stderr),  # from Tr H's Hutch++ spread
            sec,
            source,
            overlap=_finite(al.overlap),
            k=al.k,
            lambda_1=_finite(al.lambda_1),
        )

    def _src_sharpness(self, gen: _Gen, put: _Put, t0: float) -> None:
        problem = self.problem
        source = "sharpness"
        sh = expected_sharpness(
            problem, self.sigma, self.sharpness_samples, generator=gen("sharpness")
        )
        sec = time.perf_counter() - t0
        put(
            "sharpness",
            sh.signed,
            sh.signed_stderr,
            sec,
            source,
            absolute=_finite(sh.absolute),
            absolute_stderr=_finite(sh.absolute_stderr),
            sigma=sh.sigma,
            num_samples=sh.num_samples,
        )


def read_monitor(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a monitor's JSON-lines file, in file order.

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a monitor record.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such monitor file: {str(p)!r}")
    records = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(p)!r} line {n} is not JSON ({exc.msg})") from exc
        if not (
            isinstance(rec, dict) and "step" in rec and isinstance(rec.get("quantities"), dict)
        ):
            raise ValueError(
                f"{str(p)!r} line {n} is not a monitor record (expected 'step' and 'quantities')"
            )
        records.append(rec)
    if not records:
        raise ValueError(f"{str(p)!r} holds no measurement yet")
    return records
