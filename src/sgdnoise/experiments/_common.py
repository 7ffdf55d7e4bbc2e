"""Shared plumbing for experiments: run directories, environment capture, progress, figures.

Every experiment writes into one run directory:

* ``config.json`` — the full resolved configuration;
* ``env.json`` — package versions, device, git revision;
* ``metrics.jsonl`` (and/or CSV) — per-step or per-epoch metrics;
* ``results.json`` — the summary other tools read;
* figures as PNG and SVG.

All files are written atomically (temporary file + rename), so a run killed at any moment never
leaves a half-written file; JSONL readers skip a truncated last line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from .._utils import atomic_write_json, atomic_write_text

__all__ = [
    "Progress",
    "RunDir",
    "env_info",
    "load_toml_config",
    "replace_config",
    "resolve_device",
    "resolve_dtype",
    "save_figure",
    "wilson_interval",
]

T = TypeVar("T")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``/``None`` (CUDA when available)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or a torch dtype) → torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Package versions, platform, device and git revision, for ``env.json``."""
    import numpy

    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        mpl = None
    from .. import __version__

    dev = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, Any] = {
        "sgdnoise": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "matplotlib": mpl,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "git_revision": _git_revision(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dev.type == "cuda":
        info["cuda_device_name"] = torch.cuda.get_device_name(dev)
        info["cuda_version"] = torch.version.cuda
    return info


class RunDir:
    """A run directory with atomic writers for the standard artefacts."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.path / name, obj)
        return self.path / name

    def read_json(self, name: str) -> Any:
        with open(self.path / name, encoding="utf-8") as fh:
            return json.load(fh)

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.path / name, text)
        return self.path / name

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.write_json("config.json", dict(config))

    def write_env(self, device: torch.device | str | None) -> None:
        self.write_json("env.json", env_info(device))

    def write_jsonl(self, name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Rewrite a whole JSONL file atomically (one JSON object per line)."""
        from .._utils import _jsonable

        text = "".join(json.dumps(_jsonable(dict(r))) + "\n" for r in rows)
        atomic_write_text(self.path / name, text)
        return self.path / name

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """Rows of a JSONL file; a truncated last line (a killed writer) is skipped."""
        path = self.path / name
        if not path.exists():
            return []
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return rows

    def write_csv(self, name: str, rows: list[Mapping[str, Any]]) -> Path:
        """Write rows (dicts with the same keys) as CSV, atomically."""
        if not rows:
            return self.write_text(name, "")
        keys = list(rows[0].keys())
        lines = [",".join(keys)]
        for r in rows:
            lines.append(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys))
        return self.write_text(name, "\n".join(lines) + "\n")


def save_figure(fig: Any, path_stem: str | os.PathLike[str]) -> list[Path]:
    """Save a matplotlib figure as ``<stem>.png`` and ``<stem>.svg`` (atomically) and close it."""
    import io

    import matplotlib.pyplot as plt

    from .._utils import atomic_write_bytes

    stem = Path(path_stem)
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=130 if ext == "png" else None, bbox_inches="tight")
        atomic_write_bytes(stem.with_suffix(f".{ext}"), buf.getvalue())
        out.append(stem.with_suffix(f".{ext}"))
    plt.close(fig)
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def load_toml_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a TOML configuration file (``{}`` for ``None``), with a clear error when missing."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"config file {str(p)!r} does not exist; pass an existing .toml file"
        )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(p, "rb") as fh:
        return tomllib.load(fh)


def replace_config(base: T, values: Mapping[str, Any], *, what: str) -> T:
    """``base`` (a frozen dataclass) with ``values`` replaced, for TOML files and CLI flags.

    Unknown keys raise ``ValueError`` listing the valid ones; a list given for a field whose
    current value is a tuple (TOML has no tuples) becomes a tuple.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{what} config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    changes = {}
    for key, value in values.items():
        if isinstance(value, list) and isinstance(getattr(base, key), tuple | type(None)):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


class Progress:
    """A small progress bar with rate and ETA on stderr (no dependency).

    On a terminal it redraws one line; otherwise (logs, CI) it prints a line at most every
    ``min_interval`` seconds. ``enabled=False`` silences it.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool = True,
        min_interval: float = 10.0,
        stream: Any = None,
    ) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = 0.2 if self.tty else min_interval
        self.count = 0
        self.start = time.monotonic()
        self._last = 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.min_interval or self.count >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.count) / rate if rate > 0 else float("nan")
        frac = self.count / self.total if self.total else 1.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta = _fmt_seconds(left) if math.isfinite(left) else "?"
        line = (
            f"{self.desc} [{bar}] {self.count}/{self.total} "
            f"{_fmt_seconds(elapsed)} elapsed, ETA {eta}"
            + (f" | {self.postfix}" if self.postfix else "")
        )
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if self.count >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __iter__(self) -> Iterator[int]:  # pragma: no cover - convenience
        for i in range(self.total):
            yield i
            self.update()


def _fmt_seconds(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
