"""The ``sgdnoise`` command line: one sub-command per registered experiment, generated from its
configuration's declaration (:mod:`sgdnoise.config`), plus the commands of
:mod:`sgdnoise.commands`."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import importlib
import importlib.util
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._utils import OutputError, is_writer
from .config import OneOf

__all__ = ["add_experiment_parser", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what was wrong, and where the usage is (not the whole
    usage block); sub-command parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per experiment."""
    from . import __version__

    parser = _Parser(
        prog="sgdnoise",
        description=(
            "Measure and simulate the structure of SGD's gradient noise, and reproduce Zhu et al., "
            "'The Anisotropic Noise in Stochastic Gradient Descent' (ICML 2019)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sgdnoise {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .experiments import EXPERIMENTS

    for exp in EXPERIMENTS.values():
        add_experiment_parser(sub, exp)
    extra = "sgdnoise.commands"
    if importlib.util.find_spec(extra) is not None:
        importlib.import_module(extra).add_parsers(sub)
    return parser


# --------------------------------------------------------------------------------------------
# The command line, generated from the fields
# --------------------------------------------------------------------------------------------


def _strip(tp: Any) -> tuple[Any, list[Any], bool]:
    """(bare type, Annotated metadata, optional?) of a field annotation."""
    meta: list[Any] = []
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp, *more = typing.get_args(tp)
            meta += more
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(tp))
            tp = args[0]
        else:
            return tp, meta, optional


def _scalar(tp: Any, optional: bool) -> Callable[[str], Any]:
    table: dict[Any, Callable[[str], Any]] = {int: int, float: float, bool: _bool}
    base = table.get(tp, str)

    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return base(text)

    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _pairs(tp: Any) -> Callable[[str], tuple[str, Any]]:
    inner, _, optional = _strip(typing.get_args(tp)[1]) if typing.get_args(tp) else (str, [], False)
    value = _scalar(inner, optional)

    def convert(text: str) -> tuple[str, Any]:
        key, sep, raw = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
        return key, value(raw)

    return convert


def _choices(tp: Any, meta: list[Any]) -> list[Any] | None:
    for m in meta:
        if isinstance(m, OneOf):
            return list(m.source())
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, tuple):
        return " ".join(_show(v) for v in value) or "(none)"
    return str(value)


def _presets_text(name: str, presets: Mapping[str, Any]) -> str:
    shown: dict[str, list[str]] = {}
    for profile, config in presets.items():
        shown.setdefault(_show(getattr(config, name)), []).append(profile)
    if len(shown) == 1:
        return f"(every profile: {next(iter(shown))})"
    return "(" + "; ".join(f"{'/'.join(p)}: {v}" for v, p in shown.items()) + ")"


def field_flags(config_cls: Any) -> dict[str, str]:
    """Config field name → its command-line flag (``profile`` is the common ``--profile``)."""
    return {
        f.name: "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(config_cls)
        if f.name != "profile"
    }


def add_field_arguments(p: argparse.ArgumentParser, config_cls: Any, presets: Mapping) -> None:
    """One flag per field of ``config_cls`` (default ``None``: the profile/TOML value stays)."""
    group = p.add_argument_group("settings (the TOML keys of --config have the same names, with _)")
    for name, info in config_cls.__pydantic_fields__.items():
        if name == "profile":
            continue
        tp, meta, optional = _strip(info.annotation)
        meta = [*info.metadata, *meta]
        kw: dict[str, Any] = {"default": None, "dest": name}
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            item, item_meta, _ = _strip(typing.get_args(tp)[0])
            kw.update(nargs="*", type=_scalar(item, False), choices=_choices(item, item_meta))
        elif origin in (dict, Mapping, collections.abc.Mapping):
            kw.update(nargs="+", type=_pairs(tp), metavar="NAME=VALUE")
        else:
            kw.update(type=_scalar(tp, optional), choices=_choices(tp, meta))
        if not kw.get("choices") and "action" not in kw and "metavar" not in kw:
            item_tp = typing.get_args(tp)[0] if origin is tuple else tp
            kw["metavar"] = getattr(_strip(item_tp)[0], "__name__", "VALUE").upper()
        extra = " ('none' to unset)" if optional else ""
        text = f"{info.description or name.replace('_', ' ')}{extra} {_presets_text(name, presets)}"
        group.add_argument("--" + name.replace("_", "-"), help=text.replace("%", "%%"), **kw)


def flags_of(args: argparse.Namespace, config_cls: Any) -> dict[str, Any]:
    """The config values given explicitly on the command line (lists → tuples, pairs → dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name, None) if f.name != "profile" else None
        if v is None:
            continue
        if isinstance(v, list) and v and isinstance(v[0], tuple) and len(v[0]) == 2:
            v = dict(v)
        out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


COMMON = ("--profile", "--config", "--out", "--device", "--no-progress", "--plot-only")


def add_experiment_parser(sub: Any, exp: Any) -> argparse.ArgumentParser:
    """``sgdnoise <exp.name>``: the common options, then one flag per configuration field."""
    p = sub.add_parser(exp.name, help=exp.help, description=exp.description)
    p.add_argument("--profile", choices=list(exp.presets), default="quick",
                   help="preset of every setting (its values are shown with each flag; default: quick)")  # fmt: skip
    p.add_argument("--config", metavar="FILE.toml", default=None,
                   help="TOML file whose keys override the profile (explicit flags override both)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help=f"run directory (default: results/{exp.name}_<profile>); the same command resumes")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: auto, CUDA if available)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw the figures of an existing run directory")  # fmt: skip
    if exp.data:
        p.add_argument("--data-dir", default=None,
                       help="folder holding the four FashionMNIST IDX files (default: Debian's "
                       "/usr/share/datasets/fashion-mnist, then the torchvision cache)")  # fmt: skip
    add_field_arguments(p, exp.config, exp.presets)
    p.set_defaults(func=lambda args: _run_experiment(exp, args))
    return p


def _run_experiment(exp: Any, args: argparse.Namespace) -> int:
    from .runs import load_toml_config, resolve_device

    out = Path(args.out or f"results/{exp.name}_{args.profile}")
    if args.plot_only:
        if not (out / "results.json").exists():
            raise FileNotFoundError(
                f"{out / 'results.json'} does not exist; run the experiment first"
            )
        for path in exp.plot(out):
            print(path)
        return 0
    config = exp.configure(
        args.profile, load_toml_config(args.config), **flags_of(args, exp.config)
    )
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if not exp.distributed:
        from ._utils import refuse_torchrun

        refuse_torchrun(f"sgdnoise {exp.name}", "its data set is small")
    joined = _join_torchrun(device)
    ok = False
    try:
        results = exp.execute(config, out, device=device, progress=not args.no_progress and is_writer(),
                              profile=args.profile, data_dir=getattr(args, "data_dir", None))  # fmt: skip
        ok = True
    finally:
        if joined:
            import torch.distributed as dist

            if ok:  # every rank done before any tears its connections down (gloo aborts else)
                dist.barrier()
            dist.destroy_process_group()
    if is_writer():
        print(exp.summarize(results))
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _join_torchrun(device: Any) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join its process group — gloo on CPU, NCCL on CUDA
    (one GPU per rank, ``LOCAL_RANK``) — with a timeout of ``SGDNOISE_DIST_TIMEOUT`` seconds
    (default 600) so that a failing rank stops the others; ``True`` when joined here."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=float(os.environ.get("SGDNOISE_DIST_TIMEOUT", "600")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return True


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
        expected = isinstance(exc, (ValueError, TypeError, OSError, MemoryError, ImportError)) or (
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
