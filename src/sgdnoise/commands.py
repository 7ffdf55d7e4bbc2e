"""Commands that span experiments: ``sgdnoise reproduce``, ``sgdnoise plot``, ``sgdnoise list``,
``sgdnoise check`` (the self-consistency checks of :func:`sgdnoise.check` on a user's model),
``sgdnoise measure`` (:mod:`sgdnoise.measure_cli`) and ``sgdnoise plot-monitor``
(:func:`sgdnoise.figures.monitor.plot_monitor`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ._user_code import load_problem
from .experiments import EXPERIMENTS
from .experiments._protocol import require_matplotlib
from .runs import COMPLETE, RunDir, config_diff, config_identity, data_key, resolve_device

__all__ = ["add_parsers", "load_problem", "reproduce"]

PROFILES = ("smoke", "quick", "paper")


def _data_identity(name: str, data_dir: str | None) -> dict[str, Any] | None:
    """The identity of an experiment's input files (``None`` for the synthetic experiments)."""
    if not EXPERIMENTS[name].data:
        return None
    from .data import fashion_mnist_identity

    return data_key(fashion_mnist_identity(data_dir))


def _state(run_dir: Path, name: str, config: Any, data: dict[str, Any] | None) -> tuple[str, str]:
    """(state, reason) of a part: ``"done"``, ``"resume"`` (same settings, unfinished),
    ``"fresh"`` (nothing there) or ``"stale"`` (other settings or data, with the reason)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "fresh", ""
    rd = RunDir(run_dir)
    want = config_identity(config)
    marker = rd.completion()
    if marker is not None:
        why = []
        if marker.get("experiment") != name:
            why.append(f"it holds the experiment {marker.get('experiment')!r}")
        why += config_diff(marker.get("config") or {}, want)
        if data is not None and marker.get("data") != data:
            why.append("the input data files differ")
        if why:
            return "stale", "; ".join(why)
        # Finished, unless its results are damaged (then moved aside, with a message): redo.
        return ("done", "") if rd.read_json_or_quarantine("results.json") else ("resume", "")
    # Unfinished: resume only what was started with the same settings and data.
    try:
        saved = rd.read_json("config.json") if rd.exists("config.json") else None
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        return "stale", "it holds no readable config.json"
    why = config_diff(saved, want)
    if data is not None and rd.exists("data.json"):
        try:
            old = rd.read_json("data.json")
        except ValueError:
            old = None
        if not isinstance(old, dict) or {k: old.get(k) for k in data} != data:
            why.append("the input data files differ")
    return ("resume", "") if not why else ("stale", "; ".join(why))


def _move_aside(run_dir: Path) -> Path:
    n = 1
    while (target := run_dir.with_name(f"{run_dir.name}.stale-{n}")).exists():
        n += 1
    os.replace(run_dir, target)
    return target


def reproduce(
    profile: str = "quick",
    out: str | Path = "results",
    *,
    device: str = "auto",
    only: tuple[str, ...] | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every experiment's ``profile`` preset into ``out/<name>``, then write the report.

    A part is skipped only when its completion marker (written last) records the same
    configuration and the same input data; a part started with the same settings resumes; a part
    holding another configuration or other data is moved aside to ``<name>.stale-<n>`` (never
    deleted) and rerun, and the reason is printed. Returns the timings.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    names = tuple(only) if only else tuple(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; valid: {', '.join(EXPERIMENTS)}")
    dev = resolve_device(device)
    out = Path(out)
    # Resolve and validate every configuration (and find the data) before any work starts.
    plan = [
        (name, EXPERIMENTS[name].configure(profile), _data_identity(name, data_dir))
        for name in names
    ]
    # A clear error now if the folder cannot be made or written.
    timings: dict[str, Any] = RunDir(out).read_json_or_quarantine("timings.json") or {}
    for i, (name, config, data) in enumerate(plan, 1):
        head = f"[{i}/{len(plan)}] {name} ({profile})"
        seconds = _reproduce_part(out / name, head, name, config, data, profile=profile,
                                  device=dev, data_dir=data_dir, progress=progress)  # fmt: skip
        if seconds is None:
            continue
        if name in timings and seconds[1] == "resume":
            timings[name]["seconds"] = timings[name].get("seconds", 0.0) + seconds[0]
        else:
            timings[name] = {"profile": profile, "seconds": seconds[0], "device": str(dev)}
        RunDir(out).write_json("timings.json", timings)
    from .report import write_report

    write_report(out, profile=profile)
    print(f"report: {out / 'report.md'} and {out / 'report.html'}", file=sys.stderr)
    return timings


def _reproduce_part(
    run_dir: Path,
    head: str,
    name: str,
    config: Any,
    data: dict[str, Any] | None,
    **kwargs: Any,
) -> tuple[float, str] | None:
    """Run (or resume, or skip) one part; ``(seconds, state)`` or ``None`` when skipped."""
    state, why = _state(run_dir, name, config, data)
    if state == "done":
        print(f"{head}: already finished in {run_dir}, skipped", file=sys.stderr, flush=True)
        return None
    if state == "stale":
        moved = _move_aside(run_dir)
        print(f"{head}: {run_dir} holds a run with other settings ({why}); moved it to {moved} "
              "and rerunning", file=sys.stderr, flush=True)  # fmt: skip
    verb = "resuming" if state == "resume" else "running"
    print(f"{head}: {verb} into {run_dir} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    EXPERIMENTS[name].execute(config, run_dir, **kwargs)
    return time.perf_counter() - t0, state


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ._utils import refuse_torchrun

    refuse_torchrun("sgdnoise reproduce", "it runs every experiment in turn")
    reproduce(
        args.profile,
        args.out,
        device=args.device,
        only=tuple(args.only) if args.only else None,
        data_dir=args.data_dir,
        progress=not args.no_progress,
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    if (run_dir / "results.json").exists():  # one experiment's run directory
        targets = [(run_dir, _experiment_of(run_dir))]
    else:  # a reproduce output folder: redraw every part, then the report
        targets = [(run_dir / n, n) for n in EXPERIMENTS if (run_dir / n / "results.json").exists()]
        if not targets:
            raise FileNotFoundError(
                f"{str(run_dir)!r} holds no results.json; pass a run directory written by an "
                "sgdnoise experiment (or a `sgdnoise reproduce` output folder)"
            )
    require_matplotlib()
    for path, name in targets:
        files = EXPERIMENTS[name].plot(path)
        for f in files or []:
            print(f)
    if len(targets) > 1 or (run_dir / "timings.json").exists():
        from .report import write_report

        write_report(run_dir)
    return 0


def _experiment_of(run_dir: Path) -> str:
    marker = RunDir(run_dir).completion()
    if marker is not None and marker.get("experiment") in EXPERIMENTS:
        return str(marker["experiment"])
    for source in ("results.json", "config.json"):
        try:
            data = json.loads((run_dir / source).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        name = data.get("experiment") or (data.get("meta") or {}).get("experiment")
        if name in EXPERIMENTS:
            return name
        if source == "results.json" and "exponents" in data and "all_bounds_hold" in data:
            return "prop1"
    for name, exp in EXPERIMENTS.items():
        if exp.signature and all(any(run_dir.glob(f)) for f in exp.signature):
            return name
    if run_dir.name in EXPERIMENTS:
        return run_dir.name
    raise ValueError(
        f"cannot tell which experiment wrote {str(run_dir)!r}: it has no {COMPLETE} and its "
        f"files match none of {', '.join(EXPERIMENTS)}; rerun the experiment into it"
    )


def _cmd_list(args: argparse.Namespace) -> int:
    print("experiments (sgdnoise <name> --help for options):")
    for name, exp in EXPERIMENTS.items():
        print(f"  {name:<10} {exp.help}")
        for profile in PROFILES:
            if profile in exp.presets:
                print(f"      --profile {profile:<6} ~{exp.cost.get(profile, '?')}")
    print("\n`sgdnoise reproduce --profile P` runs all of them and writes report.md/report.html.")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .diagnostics import check

    if args.max_samples < 1:
        raise ValueError(f"--max-samples must be positive, got {args.max_samples}")
    problem = load_problem(args.target, device=args.device, dtype=args.dtype)
    report = check(problem, generator=args.seed, max_samples=args.max_samples)
    print(report)
    return 0 if report.ok else 1


def _cmd_plot_monitor(args: argparse.Namespace) -> int:
    from .figures.monitor import plot_monitor

    require_matplotlib()
    print(plot_monitor(args.file, args.out))
    return 0


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not ``None``/``False``) and the help text
    does not already give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def add_parsers(sub: Any) -> None:
    """Register ``reproduce``, ``plot``, ``list``, ``check``, ``measure`` and ``plot-monitor``."""
    fmt = _DefaultsShown
    p = sub.add_parser(
        "reproduce",
        help="run every experiment of the paper and write the report",
        description="Run every experiment (2-D toy, indicator, Proposition 1, FashionMNIST) with "
        "one profile, skipping parts already finished in --out, then write report.md and "
        "report.html. Interrupted runs resume when the same command is run again.",
        formatter_class=fmt,
    )
    p.add_argument(
        "--profile", choices=PROFILES, default="quick", help="cost tier of every experiment"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA if available)")
    p.add_argument("--out", default="results", help="output folder (one sub-folder per experiment)")
    p.add_argument(
        "--only", nargs="+", choices=list(EXPERIMENTS), help="run only these experiments"
    )
    p.add_argument("--data-dir", default=None, help="folder with the four FashionMNIST IDX files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser(
        "plot",
        help="redraw figures (and the report) from saved results, without recomputing",
        description="Redraw the figures of one experiment's run directory, or of every "
        "experiment folder under a `reproduce` output folder and its report, from the saved "
        "results only (nothing is recomputed). Figures need matplotlib: pip install "
        "'sgdnoise[plot]'.",
        formatter_class=fmt,
    )
    p.add_argument("run_dir", help="a run directory, or a `reproduce` output folder")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "list", help="list experiments and presets with their estimated cost", formatter_class=fmt
    )
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "check",
        help="self-consistency checks of your model (sgdnoise.check): exit 0 ok, 1 failed, 2 bad input",
        description="Run sgdnoise.check on a model given as MODULE:FUNCTION, where FUNCTION takes "
        "no arguments and returns a sgdnoise.Problem or a tuple (model, loss_fn, inputs, "
        "targets). Prints the report; exits 0 if every check passed, 1 if one failed, 2 for bad "
        "input.",
        formatter_class=fmt,
    )
    p.add_argument("target", help="MODULE:FUNCTION, MODULE a dotted name or a path to a .py file")
    p.add_argument("--device", default=None, help="move the model to cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float64"), help="cast the model to this dtype"
    )
    p.add_argument("--max-samples", type=int, default=64, help="largest subset of samples checked")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and random directions")
    p.set_defaults(func=_cmd_check)

    from .measure_cli import add_parser as add_measure_parser

    add_measure_parser(sub)

    p = sub.add_parser(
        "plot-monitor",
        help="draw every quantity of a sgdnoise.Monitor JSON-lines file against the step",
        description="Read the JSON lines written by sgdnoise.Monitor and draw one panel per "
        "quantity against the training step (Tr(HΣ) and Tr(HΣ̄) on one panel, ±1 standard error "
        "bands, log scales where values span decades, and the cost of each computation). Reads "
        "the file only; nothing is recomputed.",
        formatter_class=fmt,
    )
    p.add_argument("file", help="the monitor's .jsonl file")
    p.add_argument("--out", default=None, help="PNG to write (default: FILE with suffix .png)")
    p.set_defaults(func=_cmd_plot_monitor)
