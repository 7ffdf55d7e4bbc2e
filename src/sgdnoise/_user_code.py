"""Loading the user's own code: ``MODULE:FUNCTION`` specs (a dotted module or a path to a .py
file) as given to ``sgdnoise check`` and ``sgdnoise measure``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .runs import resolve_device

__all__ = ["import_target", "load_problem"]


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def import_target(spec: str) -> Any:
    """Import ``MODULE:FUNCTION`` (MODULE a dotted name or a path to a .py file) → the callable."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(
            f"expected MODULE:FUNCTION (e.g. mymodels:make or path/to/file.py:make), got {spec!r}"
        )
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"no such Python file: {module_name!r} (from {spec!r})")
        name = f"_sgdnoise_check_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {module_name!r} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)  # sibling imports of the user's file
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"importing {module_name!r} raised {_one_line(exc)}") from exc
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())  # console scripts do not search the current folder
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            missing = isinstance(exc, ModuleNotFoundError) and module_name.startswith(
                exc.name or "?"
            )
            if missing:
                raise ValueError(
                    f"module {module_name!r} not found ({exc}); give an importable module name "
                    "or a path to a .py file"
                ) from exc
            raise ValueError(f"importing {module_name!r} raised {_one_line(exc)}") from exc
        finally:
            if added and os.getcwd() in sys.path:
                sys.path.remove(os.getcwd())
    func = getattr(module, func_name, None)
    if func is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"{module_name!r} has no function {func_name!r}; callables there: "
            f"{', '.join(public) or 'none'}"
        )
    if not callable(func):
        raise TypeError(f"{spec!r} is a {type(func).__name__}, not a function")
    return func


def load_problem(spec: str, *, device: str | None = None, dtype: str | None = None) -> Any:
    """Call the zero-argument ``MODULE:FUNCTION`` and return a :class:`sgdnoise.Problem`.

    FUNCTION returns a ``Problem`` or a tuple ``(model, loss_fn, inputs, targets)``. ``device``
    and ``dtype`` (``"float32"``/``"float64"``), when given, move the model (and its data).

    Raises:
        ValueError, FileNotFoundError, TypeError: bad input (module not found, function missing,
            wrong return type, the function raised); one line each.
    """
    import torch

    from .problem import Problem
    from .runs import resolve_dtype

    func = import_target(spec)
    try:
        made = func()
    except Exception as exc:
        raise ValueError(f"calling {spec}() raised {_one_line(exc)}") from exc
    if isinstance(made, Problem):
        reduction = getattr(made, "reduction", "mean")
        parts = (made.model, made.loss_fn, made.inputs, made.targets)
        kwargs: dict[str, Any] = {"chunk_size": made.chunk_size}
        if reduction != "mean":
            kwargs["reduction"] = reduction
    elif isinstance(made, (tuple, list)) and len(made) == 4:
        parts, kwargs = tuple(made), {}
        if not isinstance(parts[0], torch.nn.Module) or not all(
            isinstance(t, torch.Tensor) for t in parts[2:]
        ):
            raise TypeError(
                f"{spec}() returned a tuple of "
                f"({', '.join(type(t).__name__ for t in parts)}); expected (model: nn.Module, "
                "loss_fn, inputs: Tensor, targets: Tensor)"
            )
    else:
        raise TypeError(
            f"{spec}() returned {type(made).__name__}; expected a sgdnoise.Problem or a tuple "
            "(model, loss_fn, inputs, targets)"
        )
    if device is None and dtype is None:
        return made if isinstance(made, Problem) else parts
    model, loss_fn, inputs, targets = parts
    to: dict[str, Any] = {}
    if device is not None:
        to["device"] = resolve_device(device)
    if dtype is not None:
        to["dtype"] = resolve_dtype(dtype)
    model = model.to(**to)
    # Problem casts floating inputs/targets to the model's dtype and device itself.
    parts = (model, loss_fn, inputs, targets)
    return Problem(*parts, **kwargs) if isinstance(made, Problem) else parts
