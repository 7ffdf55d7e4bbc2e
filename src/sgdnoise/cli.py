"""The ``sgdnoise`` command line: a thin layer over :mod:`sgdnoise.experiments`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from ._utils import OutputError
from .experiments import EXPERIMENTS

__all__ = ["build_parser", "main"]


def _experiment_modules() -> list[object]:
    mods = []
    for name in EXPERIMENTS:
        modname = f"sgdnoise.experiments.{name}"
        if importlib.util.find_spec(modname) is not None:
            mods.append(importlib.import_module(modname))
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per experiment."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sgdnoise",
        description=(
            "Measure and simulate the structure of SGD's gradient noise, and reproduce Zhu et al., "
            "'The Anisotropic Noise in Stochastic Gradient Descent' (ICML 2019)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sgdnoise {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _experiment_modules():
        mod.add_parser(sub)  # type: ignore[attr-defined]
    extra = "sgdnoise.commands"
    if importlib.util.find_spec(extra) is not None:
        importlib.import_module(extra).add_parsers(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages keep their bullet points)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.strerror:
        where = exc.filename or ""
        text = f"{exc.strerror}" + (f": {where!s}" if where else "")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sgdnoise`` console script.

    Every expected failure (bad values, missing or damaged files, paths that cannot be written,
    devices, memory) prints one ``sgdnoise <command>: error: ...`` message and returns 2 (1 for an
    unexpected error); ``--debug`` shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(
            "interrupted; finished parts are kept, run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        if args.debug:
            raise
        expected = isinstance(exc, (ValueError, TypeError, OSError, MemoryError)) or (
            isinstance(exc, RuntimeError) and _is_oom(exc)
        )
        prefix = f"sgdnoise {args.command}: error: "
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _is_oom(exc)):
            msg = (
                _one_line(exc)
                if isinstance(exc, MemoryError) and str(exc)
                else (
                    "out of memory; use smaller settings (fewer runs, samples or a smaller "
                    "profile) or a machine with more memory"
                )
            )
        else:
            msg = _one_line(exc)
        if not expected:
            msg = f"unexpected {type(exc).__name__}: {msg} (run `sgdnoise --debug {args.command} ...` for the traceback)"
        print(prefix + msg, file=sys.stderr)
        return 2 if expected else 1


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
