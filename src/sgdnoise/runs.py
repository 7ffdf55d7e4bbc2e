"""Run directories, environment capture, progress and figure saving, shared by the experiments.

Every experiment writes into one run directory:

* ``config.json`` — the full resolved configuration;
* ``env.json`` — package versions, device, git revision;
* ``metrics.jsonl`` (and/or CSV) — per-step or per-epoch metrics;
* ``results.json`` — the summary other tools read;
* figures as PNG and SVG;
* ``complete.json`` — the completion marker, written last (experiment, configuration, identity
  of the input data); a folder without it holds an unfinished run, whatever else it contains.

All files are written atomically (temporary file + rename) with the user's umask, so a run killed
at any moment never leaves a half-written file; a temporary file of a killed writer is removed
when a run next opens the folder. JSONL readers skip a truncated last line; a damaged JSON or
checkpoint file is named, moved aside as ``<name>.damaged-<n>`` and recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._utils import (
    _jsonable,
    atomic_write_json,
    atomic_write_text,
    is_writer,
    prepare_out_dir,
    sweep_temp,
)

__all__ = [
    "COMPLETE",
    "Progress",
    "RunDir",
    "check_memory",
    "config_diff",
    "config_identity",
    "data_key",
    "env_info",
    "load_toml_config",
    "notice",
    "num_threads",
    "quarantine",
    "resolve_device",
    "resolve_dtype",
    "wilson_interval",
]


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
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device {str(device)!r} is not supported (sgdnoise computes on 'cpu' or 'cuda'); "
            "use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s), cuda:0 … cuda:"
            f"{torch.cuda.device_count() - 1}"
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


def config_identity(config: Any) -> dict[str, Any]:
    """A configuration as plain JSON data (tuples → lists, mappings sorted), for comparisons."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        data = dict(config)

    def norm(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return json.loads(json.dumps(norm(_jsonable(data)), default=str))


def data_key(ident: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run's input data: its identity without the folder the files lie in."""
    return {k: v for k, v in ident.items() if k != "source"}


def config_diff(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"key: saved → wanted"`` for every key of ``wanted`` whose saved value differs."""
    out = []
    for key, value in wanted.items():
        old = saved.get(key, "<missing>")
        if old != value:
            out.append(f"{key}: {json.dumps(old)} → {json.dumps(value)}")
    return out


def check_memory(nbytes: int, device: torch.device, *, what: str, fix: str) -> None:
    """Refuse (``MemoryError`` with one clear line) work whose memory need exceeds the device's.

    ``nbytes`` is the caller's estimate of its peak need; it is compared with the physical memory
    of the machine (CPU) or the free memory of the GPU.
    """
    try:
        if device.type == "cuda":
            have = torch.cuda.mem_get_info(device)[1]
        else:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError, RuntimeError):  # pragma: no cover - exotic OS
        return
    if nbytes > have:
        raise MemoryError(
            f"{what} need about {_fmt_bytes(nbytes)} of memory, more than the "
            f"{_fmt_bytes(have)} of {device.type}; {fix}"
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TB"  # pragma: no cover


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
    from . import __version__

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


#: The completion marker: written last by every experiment, removed when a run (re)starts.
COMPLETE = "complete.json"


class RunDir:
    """A run directory with atomic writers for the standard artefacts.

    A run directory is *complete* only when :data:`COMPLETE` exists: every experiment removes it
    when it starts and writes it last, recording the experiment, its configuration and the
    identity of its input data (see :meth:`mark_complete`). Creating a ``RunDir`` also removes
    temporary files left by writers that were killed (see :func:`sgdnoise._utils.sweep_temp`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        prepare_out_dir(self.path)
        sweep_temp(self.path)

    def mark_complete(
        self, experiment: str, config: Any, *, data: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the completion marker (call it after every other artefact is written)."""
        from . import __version__

        marker = {
            "experiment": experiment,
            "config": config_identity(config),
            "data": _jsonable(dict(data)) if data is not None else None,
            "sgdnoise": __version__,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return self.write_json(COMPLETE, marker)

    def clear_complete(self) -> None:
        """Remove the completion marker: the directory is being (re)written."""
        if not is_writer():
            return
        with contextlib.suppress(FileNotFoundError):
            (self.path / COMPLETE).unlink()

    def completion(self) -> dict[str, Any] | None:
        """The completion marker's content, or ``None`` when the run is not complete.

        A damaged marker counts as missing (the run is then simply redone or resumed).
        """
        try:
            marker = self.read_json(COMPLETE)
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and "config" in marker else None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.path / name, obj)
        return self.path / name

    def read_json(self, name: str) -> Any:
        """The content of a JSON file; ``ValueError`` naming the file if it is not valid JSON."""
        path = self.path / name
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path} is damaged (not valid JSON: {exc}); rerun the experiment that wrote it "
                "(the same command resumes), or remove the file"
            ) from exc

    def read_json_or_quarantine(self, name: str) -> Any:
        """The content of a JSON file, or ``None`` if it is missing or damaged.

        A damaged file is moved aside (see :func:`quarantine`), never deleted.
        """
        try:
            return self.read_json(name)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as exc:
            quarantine(self.path / name, str(exc.__cause__ or exc))
            return None

    def config_changes(
        self, config: Mapping[str, Any], *, ignore: Iterable[str] = ()
    ) -> list[str] | None:
        """The keys whose value differs from the ``config.json`` an earlier run left here.

        Values are compared as JSON data (:func:`config_identity`: tuples and lists alike); a key
        missing on one side counts as ``None``.

        Args:
            config: the configuration about to be written as ``config.json``.
            ignore: keys that may differ (labels, the device).

        Returns:
            The differing keys (``[]``: the same run), or ``None`` when there is no readable
            earlier ``config.json`` (a damaged one is moved aside, see :func:`quarantine`).
        """
        old = self.read_json_or_quarantine("config.json")
        if not isinstance(old, dict):
            return None
        old, new = config_identity(old), config_identity(config)
        skip = set(ignore)
        keys = dict.fromkeys([*new, *old])
        return [k for k in keys if k not in skip and old.get(k) != new.get(k)]

    def refuse_other_config(self, config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> None:
        """Refuse to resume an earlier run here whose configuration differs (``ignore`` aside).

        Raises:
            ValueError: naming the differing keys and how to start over.
        """
        diff = self.config_changes(config, ignore=ignore)
        if diff:
            raise ValueError(
                f"the run directory {str(self.path)!r} holds a run with different settings "
                f"({', '.join(diff)}); resuming would mix protocols. Use another --out, or delete "
                "that directory to start over."
            )

    def refuse_other_data(self, ident: Mapping[str, Any], *, what: str = "input") -> None:
        """Refuse to resume an earlier run here on other input files than its ``data.json`` names.

        Args:
            ident: ``{"source": folder, "files": {role: identity}, ...}`` of the files found now
                (e.g. :func:`sgdnoise.data.fashion_mnist_identity`); compared by :func:`data_key`.
            what: the data set's name, for the message.

        Raises:
            ValueError: naming the files that differ and the ``--data-dir`` that resumes.
        """
        old = self.read_json_or_quarantine("data.json")
        if not isinstance(old, dict) or data_key(old) == data_key(ident):
            return
        was, now = old.get("files") or {}, ident.get("files") or {}
        roles = [r for r in dict.fromkeys([*was, *now]) if was.get(r) != now.get(r)]
        raise ValueError(
            f"the run directory {str(self.path)!r} was started on the {what} files in "
            f"{old.get('source')!r}, but the files found now (in {ident.get('source')!r}) differ "
            f"({', '.join(roles) or 'sizes'}); resuming would mix two data sets. Pass "
            f"--data-dir {old.get('source')} to resume, or use another --out"
        )

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
        from ._utils import _jsonable

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

    def write_csv(self, name: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Write rows (dicts with the same keys) as CSV, atomically."""
        if not rows:
            return self.write_text(name, "")
        keys = list(rows[0].keys())
        lines = [",".join(keys)]
        for r in rows:
            lines.append(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys))
        return self.write_text(name, "\n".join(lines) + "\n")


def notice(message: str) -> None:
    """One line to stderr about something the user should know (not an error)."""
    print(f"sgdnoise: {message}", file=sys.stderr, flush=True)


def quarantine(path: str | os.PathLike[str], why: str) -> Path:
    """Move a damaged file aside as ``<name>.damaged-<n>`` (never delete it) and say so."""
    path = Path(path)
    if not is_writer():  # rank 0 moves it
        return path
    n = 1
    while (target := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    os.replace(path, target)
    notice(
        f"warning: {path} is damaged or unreadable ({why}); moved it to {target.name} and "
        "recomputing from the last good state"
    )
    return target


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default).

    With p̂ = k/n: ``(p̂ + z²/2n ± z √(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``. The bounds are exact at
    the edges — the lower bound is 0 at k = 0 and the upper bound 1 at k = n (the formula gives
    them only up to rounding) — and p̂ always lies inside the returned interval.
    """
    if isinstance(successes, bool) or isinstance(n, bool):
        raise TypeError("wilson_interval takes integer counts, not booleans")
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes == n else max(p, min(1.0, centre + half))
    return low, high


def load_toml_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a TOML configuration file (``{}`` for ``None``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid TOML or cannot be read; the message names the file and
            (for syntax errors) the line and column.
    """
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
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from exc


class Progress:
    """A small progress bar with rate and ETA on stderr (no dependency).

    The ETA weights every step by its *cost*: a step that costs six times another counts six
    times in the remaining work. ``work_total`` is the whole run's work in any unit (e.g. GD
    steps); each :meth:`update` says how much work its steps did (default: one unit per step).
    The time per unit is measured on the work done in this session only — steps that were merely
    loaded (a finished phase, a resumed checkpoint) are passed to :meth:`skip`, which shortens
    the remaining work without making the run look faster than it is.

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
        work_total: float | None = None,
        clock: Any = None,
    ) -> None:
        self.total = max(0, int(total))
        self.work_total = float(self.total if work_total is None else work_total)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = 0.2 if self.tty else min_interval
        self.clock = clock or time.monotonic
        self.count = 0
        self.work_done = 0.0  # all work done, skipped included
        self.work_run = 0.0  # work done in this session (the rate's denominator)
        self.start = self.clock()
        self._last = 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None, *, work: float | None = None) -> None:
        """``n`` steps were computed, doing ``work`` units (default ``n``)."""
        self.count += n
        w = float(n if work is None else work)
        self.work_done += w
        self.work_run += w
        self._maybe_draw(postfix)

    def skip(self, n: int, *, work: float | None = None, postfix: str | None = None) -> None:
        """``n`` steps (``work`` units) were already done before this session (loaded)."""
        self.count += n
        self.work_done += float(n if work is None else work)  # not in work_run: no time taken
        self._maybe_draw(postfix)

    def eta(self) -> float:
        """Seconds left: the remaining work times the measured seconds per unit of work."""
        elapsed = self.clock() - self.start
        if self.work_run <= 0 or elapsed <= 0:
            return math.nan
        return max(0.0, self.work_total - self.work_done) * elapsed / self.work_run

    def _maybe_draw(self, postfix: str | None) -> None:
        if postfix is not None:
            self.postfix = postfix
        now = self.clock()
        if self.enabled and (now - self._last >= self.min_interval or self.count >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        left = self.eta()
        frac = min(1.0, self.work_done / self.work_total) if self.work_total else 1.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta = _fmt_seconds(left) if math.isfinite(left) else "?"
        line = (
            f"{self.desc} [{bar}] {100 * frac:.0f}% (step {self.count}/{self.total}) "
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


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block (``None``: unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
