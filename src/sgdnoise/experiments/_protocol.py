"""The experiment protocol: the registry entry every experiment declares (:class:`Experiment`).

An experiment is a typed configuration (declared once with :func:`sgdnoise.config.experiment_config`:
fields → CLI flags, TOML keys and validation), ``run(config, out, *, device, progress, profile) ->
results`` that draws nothing, a figures module that draws from the saved results, a summary and
the report's claims. ``sgdnoise <name>``, ``reproduce``, ``plot``, ``list`` and the report iterate
:data:`sgdnoise.experiments.EXPERIMENTS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._utils import is_writer
from ..config import configure

__all__ = ["Experiment", "PlotDependencyError", "require_matplotlib"]


# --------------------------------------------------------------------------------------------
# The registry entry
# --------------------------------------------------------------------------------------------


class PlotDependencyError(ImportError):
    """Figures need matplotlib, which is an optional extra."""


def require_matplotlib() -> None:
    """Raise :class:`PlotDependencyError` (one line saying how to install it) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotDependencyError(
            "figures need matplotlib, which is not installed; pip install 'sgdnoise[plot]'"
        ) from None


def _load(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: what the CLI, ``reproduce``, ``plot``, ``list`` and the report iterate.

    Attributes:
        name: sub-command and folder name.
        help: one sentence for ``sgdnoise list`` and ``sgdnoise --help``.
        description: the paragraph of ``sgdnoise <name> --help``.
        title: the report section's title.
        config: the configuration class (see :func:`experiment_config`).
        presets: profile name → configuration (``smoke``, ``quick``, ``paper``).
        run: ``run(config, out, *, device, progress, profile) -> results``.
        summary: ``"module:function"`` of ``summary(results) -> str``, the table printed at the
            end (see :meth:`summarize`).
        figures: ``"module:function"`` of ``plot(run_dir) -> list[Path]`` (see :meth:`plot`).
        claims: ``"module:function"`` of ``claims(results) -> list[Claim]``, the report's rows
            (see :meth:`claims_of`).

    The three are imported on use: the registry imports neither the figures nor the report
    (which iterates it).
        cost: profile → measured wall time (for ``sgdnoise list``).
        data: whether it reads FashionMNIST (``--data-dir``; the data identity guards resuming).
        signature: file patterns only this experiment writes (to recognise old run directories).
        distributed: whether it shards its data under ``torchrun`` (the others are refused
            there: every rank would hold the whole data set, which a sharded problem would count
            R times).
    """

    name: str
    help: str
    description: str
    title: str
    config: type
    presets: Mapping[str, Any]
    run: Callable[..., dict[str, Any]]
    summary: str
    figures: str
    claims: str
    cost: Mapping[str, str]
    data: bool = False
    signature: tuple[str, ...] = ()
    distributed: bool = False

    def configure(
        self, profile: str = "quick", toml: Mapping[str, Any] | None = None, **flags: Any
    ) -> Any:
        """The ``profile`` preset, then a TOML table, then explicit flags (``None``: not given).

        Raises:
            ConfigError: an unknown profile or key, or an invalid value (one line).
        """
        return configure(self.presets, profile, toml, flags, what=self.name)

    def execute(
        self,
        config: Any,
        out: str | Path,
        *,
        device: Any = "auto",
        progress: bool = True,
        profile: str | None = None,
        data_dir: str | None = None,
    ) -> dict[str, Any]:
        """Validate ``config`` and run the experiment into ``out`` (then draw, when installed)."""
        config.validate()
        params = inspect.signature(self.run).parameters
        kwargs: dict[str, Any] = {"device": device, "progress": progress}
        kwargs["profile"] = profile
        if "data_dir" in params:
            kwargs["data_dir"] = data_dir
        results = self.run(config, out, **kwargs)
        if not is_writer():  # under torchrun, rank 0 alone draws
            return results
        try:
            self.plot(out)
        except PlotDependencyError as exc:
            print(f"sgdnoise {self.name}: figures skipped: {exc}", file=sys.stderr)
        return results

    def plot(self, run_dir: str | Path) -> list[Path]:
        """Draw the figures of a run directory from its ``results.json``."""
        require_matplotlib()
        return list(_load(self.figures)(Path(run_dir)) or [])

    def summarize(self, results: dict[str, Any]) -> str:
        """The short table printed at the end of a run (``summary``, imported now)."""
        return str(_load(self.summary)(results))

    def claims_of(self, results: dict[str, Any]) -> list[Any]:
        """The report's claims about ``results`` (``claims``, imported now)."""
        return list(_load(self.claims)(results))
