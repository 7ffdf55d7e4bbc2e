"""The ``sgdnoise`` command line: a thin layer over :mod:`sgdnoise.experiments`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _experiment_modules():
        mod.add_parser(sub)  # type: ignore[attr-defined]
    extra = "sgdnoise.commands"
    if importlib.util.find_spec(extra) is not None:
        importlib.import_module(extra).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sgdnoise`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"sgdnoise {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; finished parts are kept, run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
