"""``sgdnoise measure``: the noise-structure measures of a user's model and data, from the shell.

::

    sgdnoise measure --model mymodels:make --weights ckpt.pt --data probe.npz --batch-size 32 \\
        --quantities tr_HS tr_HS_iso lambda_max --out measure-results

* ``--model MODULE:FACTORY``: MODULE a dotted name (searched from the current folder too) or a
  path to a ``.py`` file; FACTORY takes no arguments and returns an ``nn.Module`` or a pair
  ``(model, loss_fn)``.
* ``--weights FILE``: a ``state_dict`` saved with ``torch.save(model.state_dict(), FILE)`` (or a
  dict holding it under ``"state_dict"`` or ``"model"``), loaded with
  ``torch.load(..., weights_only=True)``; every key and shape must fit the model.
* ``--data``: an ``.npz`` file (``numpy.savez``) or a ``.pt``/``.pth`` file (``torch.save`` of a
  dict) holding the inputs and targets under the keys ``x``/``y`` or ``inputs``/``targets``
  (a ``.pt`` file may also hold a pair ``(inputs, targets)``); or ``MODULE:FACTORY`` returning a
  pair ``(inputs, targets)`` of tensors, a ``Dataset``, a non-shuffling ``DataLoader`` or a list
  of ``(inputs, targets)`` batches.
* ``--loss MODULE:FUNCTION`` (``loss_fn(outputs, targets)`` → mean loss), taking precedence over
  one returned by the model factory; by default cross-entropy for integer targets and the mean
  squared error for floating targets.

The model is measured in eval mode, at the loaded weights, with :class:`sgdnoise.Monitor`'s
measurement (one record, the same quantities and JSON fields). Writes ``measure.json`` and a
self-contained ``measure.html`` into ``--out``; progress with an ETA goes to stderr. Bad input
(a module, function or file that is missing, data without the expected keys, weights that do not
fit the model, a model that cannot take the data) gives one line and exit code 2.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._utils import refuse_torchrun

__all__ = ["DATA_KEYS", "add_parser", "load_data", "load_model", "run_measure"]

#: Accepted (inputs, targets) key pairs of ``.npz`` / ``.pt`` data files, in order of preference.
DATA_KEYS = (("x", "y"), ("inputs", "targets"))

_FILE_SUFFIXES = (".npz", ".pt", ".pth")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _call(spec: str) -> Any:
    from ._user_code import import_target

    func = import_target(spec)
    try:
        return func()
    except Exception as exc:
        raise ValueError(f"calling {spec}() raised {_one_line(exc)}") from exc


def _state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"weights file {path!r} does not hold a state_dict (a dict of name → tensor, or one "
            "under 'state_dict'/'model'); save it with torch.save(model.state_dict(), FILE)"
        )
    return obj


def _load_weights(model: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {path!r}")
    obj = _torch_load(
        p, f"weights {path!r}", "save a state_dict: torch.save(model.state_dict(), FILE)"
    )
    sd = _state_dict(obj, path)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [
        f"{k} {list(sd[k].shape)} vs model {list(want[k].shape)}"
        for k in want
        if k in sd and sd[k].shape != want[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                shown = ", ".join(items[:4]) + (
                    f", ... ({len(items)} in all)" if len(items) > 4 else ""
                )
                parts.append(f"{what}: {shown}")
        raise ValueError(f"weights {path!r} do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(sd)


def load_model(
    spec: str,
    weights: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, loss_fn or None)`` from ``MODULE:FACTORY``, with ``weights`` loaded, in eval mode."""
    made = _call(spec)
    loss_fn = None
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], nn.Module):
        made, loss_fn = made
        if not callable(loss_fn):
            raise TypeError(
                f"{spec}() returned (model, {type(loss_fn).__name__}); the loss must be callable"
            )
    if not isinstance(made, nn.Module):
        raise TypeError(
            f"{spec}() returned {type(made).__name__}; expected an nn.Module or (model, loss_fn)"
        )
    model = made
    if weights is not None:
        _load_weights(model, weights)
    to: dict[str, Any] = {"device": torch.device(device)}
    if dtype is not None:
        to["dtype"] = dtype
    return model.to(**to).eval(), loss_fn


def _as_tensor(value: Any, key: str, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    else:
        import numpy as np

        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{path!r}: {key!r} has dtype {arr.dtype}; expected numbers")
        t = torch.from_numpy(arr)
    if not t.is_floating_point() and t.dtype != torch.bool:
        t = t.long()  # class indices (cross-entropy wants int64)
    return t


def _pick_keys(keys: list[str], path: str) -> tuple[str, str]:
    for xk, yk in DATA_KEYS:
        if xk in keys and yk in keys:
            return xk, yk
    wanted = " or ".join(f"{xk!r}/{yk!r}" for xk, yk in DATA_KEYS)
    raise ValueError(f"data file {path!r} has keys {sorted(keys)}; expected {wanted}")


def load_data(spec: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` tensors, or ``(data_set, None)`` for a Dataset / DataLoader / batches.

    ``spec`` is an ``.npz``/``.pt``/``.pth`` file or ``MODULE:FACTORY`` (see the module docstring).
    """
    if spec.lower().endswith(_FILE_SUFFIXES):
        p = Path(spec)
        if not p.is_file():
            raise FileNotFoundError(f"no such data file: {spec!r}")
        if p.suffix.lower() == ".npz":
            import numpy as np

            try:
                with np.load(p, allow_pickle=False) as npz:
                    xk, yk = _pick_keys(list(npz.files), spec)
                    return _as_tensor(npz[xk], xk, spec), _as_tensor(npz[yk], yk, spec)
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(f"cannot read {spec!r} as .npz ({_one_line(exc)})") from exc
        obj = _torch_load(
            p, repr(spec), "save a dict of tensors, e.g. torch.save({'x': x, 'y': y}, FILE)"
        )
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return _as_tensor(obj[0], "inputs", spec), _as_tensor(obj[1], "targets", spec)
        if not isinstance(obj, dict):
            raise ValueError(
                f"data file {spec!r} holds a {type(obj).__name__}; expected a dict with keys "
                "'x'/'y' or 'inputs'/'targets', or a pair (inputs, targets)"
            )
        xk, yk = _pick_keys([str(k) for k in obj], spec)
        return obj[xk], _as_tensor(obj[yk], yk, spec)
    if ":" not in spec:
        raise ValueError(
            f"--data {spec!r}: expected an .npz/.pt file or MODULE:FACTORY (e.g. mydata:probe)"
        )
    made = _call(spec)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], torch.Tensor):
        return made[0], made[1]
    return made, None


def _first_target(inputs: Any, targets: Any) -> Any:
    """One target (for the default loss): of the tensor, or the first item of a data set."""
    if targets is not None:
        return targets
    try:
        if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__getitem__"):
            item = inputs[0]
        else:
            item = next(iter(inputs))
        return item[1] if isinstance(item, (tuple, list)) else item.get("labels")
    except Exception as exc:
        raise ValueError(
            f"cannot read a first (inputs, targets) item of the data ({_one_line(exc)}); pass "
            "--loss, or data that yields (inputs, targets)"
        ) from exc


def default_loss(inputs: Any, targets: Any) -> tuple[Any, str]:
    """Cross-entropy for integer targets, mean squared error for floating ones."""
    import torch.nn.functional as F

    y = _first_target(inputs, targets)
    floating = y.is_floating_point() if isinstance(y, torch.Tensor) else isinstance(y, float)
    if floating:
        return F.mse_loss, "mse_loss (floating targets)"
    if isinstance(y, (torch.Tensor, int)):
        return F.cross_entropy, "cross_entropy (integer targets)"
    raise ValueError(
        f"cannot choose a default loss for targets of type {type(y).__name__}; pass --loss"
    )


def run_measure(
    model_spec: str,
    data_spec: str,
    batch_size: int,
    *,
    weights: str | None = None,
    quantities: list[str] | None = None,
    loss_spec: str | None = None,
    out: str | Path = "measure-results",
    device: str = "cpu",
    dtype: str | None = None,
    seed: int = 0,
    num_samples: int | None = None,
    sigma: float = 0.01,
    sharpness_samples: int = 100,
    alignment_k: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Load, measure, write ``measure.json`` and ``measure.html`` into ``out``; returns the JSON."""
    from .monitor import QUANTITIES, check_quantities
    from .runs import env_info, resolve_device

    names = check_quantities(quantities)
    dev = resolve_device(device)
    monitor, loss_name = _monitor(
        model_spec,
        data_spec,
        weights,
        loss_spec,
        dev,
        dtype,
        names,
        batch_size,
        seed=seed,
        num_samples=num_samples,
        alignment_k=alignment_k,
        sigma=sigma,
        sharpness_samples=sharpness_samples,
    )
    problem = monitor.problem
    try:  # the model's own errors (shapes, dtypes) as one line, before any long computation
        problem.loss(indices=torch.arange(min(2, problem.num_samples)))
    except (RuntimeError, IndexError) as exc:
        raise ValueError(f"the model cannot be evaluated on the data: {_one_line(exc)}") from exc
    on_done = _progress_bar(monitor, names, progress)
    t0 = time.perf_counter()
    record = monitor.measure(0, on_done=on_done)
    result = {
        "model": model_spec,
        "weights": weights,
        "data": data_spec,
        "loss": loss_name,
        "batch_size": batch_size,
        "num_samples": problem.num_samples,
        "dim": problem.dim,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "device": str(dev),
        "seed": seed,
        "measurement_seed": record["seed"],
        "seconds": time.perf_counter() - t0,
        "quantities": record["quantities"],
        "meanings": {n: QUANTITIES[n] for n in names},
        "env": env_info(dev),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from ._utils import atomic_write_text

    atomic_write_text(out / "measure.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "measure.html", _html(result))
    return result


def _monitor(
    model_spec: str,
    data_spec: str,
    weights: str | None,
    loss_spec: str | None,
    dev: torch.device,
    dtype: str | None,
    names: list[str],
    batch_size: int,
    **options: Any,
) -> tuple[Any, str]:
    """The model, data and loss loaded into a one-shot :class:`~sgdnoise.Monitor`, and the
    loss's description."""
    from .monitor import Monitor
    from .runs import resolve_dtype

    model, factory_loss = load_model(
        model_spec, weights, device=dev, dtype=None if dtype is None else resolve_dtype(dtype)
    )
    inputs, targets = load_data(data_spec)
    if loss_spec is not None:
        from ._user_code import import_target

        loss_fn, loss_name = import_target(loss_spec), loss_spec
    elif factory_loss is not None:
        loss_fn, loss_name = factory_loss, f"returned by {model_spec}"
    else:
        loss_fn, loss_name = default_loss(inputs, targets)
    seed = options.pop("seed")
    monitor = Monitor(
        model,
        loss_fn,
        inputs,
        targets,
        every=1,
        quantities=names,
        batch_size=batch_size,
        path=None,
        generator=seed,
        **options,
    )
    return monitor, loss_name


def _progress_bar(
    monitor: Any, names: list[str], progress: bool
) -> Callable[[str, float, int, int], None]:
    """A progress bar over the monitor's computations (one line on stderr first)."""
    from .runs import Progress

    problem, plan = monitor.problem, monitor.plan()
    bar = Progress(len(plan), "measure", enabled=progress, min_interval=0.0)
    if progress:
        print(
            f"measuring {', '.join(names)} on N = {problem.num_samples} samples, "
            f"D = {problem.dim} parameters ({len(plan)} computations)",
            file=sys.stderr,
            flush=True,
        )

    def on_done(source: str, seconds: float, done: int, total: int) -> None:
        bar.update(1, postfix=f"{source} {seconds:.2f}s")

    return on_done


def _torch_load(p: Path, what: str, fix: str) -> Any:
    """``torch.load(p, weights_only=True)`` on the CPU; a ``ValueError`` saying ``fix`` if not."""
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot load {what} with torch.load(weights_only=True) ({_one_line(exc)}); {fix}"
        ) from exc


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _html(result: dict[str, Any]) -> str:
    """A short, self-contained page (no external assets; every text escaped)."""
    e = html.escape
    settings = [
        ("model", result["model"]),
        ("weights", result["weights"] or "(as built by the factory)"),
        ("data", result["data"]),
        ("loss", result["loss"]),
        ("samples N", result["num_samples"]),
        ("parameters D", result["dim"]),
        ("batch size b", result["batch_size"]),
        ("dtype / device", f"{result['dtype']} / {result['device']}"),
        ("seed", result["seed"]),
        ("total time", f"{result['seconds']:.2f} s"),
    ]
    rows = []
    for name, entry in result["quantities"].items():
        value = _fmt(entry["value"])
        if entry.get("stderr"):
            value += f" ± {_fmt(entry['stderr'])}"
        rows.append(
            f"<tr><td><code>{e(name)}</code></td><td>{e(result['meanings'][name])}</td>"
            f"<td class=num>{e(value)}</td><td class=num>{e(_fmt(entry['seconds']))}</td>"
            f"<td>{e(entry['source'])}</td></tr>"
        )
    info = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in settings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sgdnoise measure: {e(result["model"])}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>sgdnoise measure</h1>
<table>{info}</table>
<table><tr><th>quantity</th><th>meaning</th><th>value ± standard error</th><th>seconds</th>
<th>computed by</th></tr>
{"".join(rows)}
</table>
<p>Conventions: Σ_b is the gradient-level covariance of a size-b mini-batch gradient (divisor N),
Σ̄ = (Tr Σ_b / D) I, H the Hessian of the mean loss; the model was measured in eval mode.
Quantities computed by one call share its time. Numbers are also in <code>measure.json</code>.</p>
</body></html>
"""


def _cmd_measure(args: argparse.Namespace) -> int:
    refuse_torchrun("sgdnoise measure", "every rank would load the whole data set")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    result = run_measure(
        args.model,
        args.data,
        args.batch_size,
        weights=args.weights,
        quantities=args.quantities,
        loss_spec=args.loss,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        num_samples=args.num_samples,
        sigma=args.sigma,
        sharpness_samples=args.sharpness_samples,
        alignment_k=args.alignment_k,
        progress=not args.no_progress,
    )
    width = max(len(n) for n in result["quantities"])
    for name, entry in result["quantities"].items():
        se = f" ± {_fmt(entry['stderr'])}" if entry.get("stderr") else ""
        print(f"{name:<{width}}  {_fmt(entry['value'])}{se}  ({entry['seconds']:.2f} s)")
    print(f"wrote {Path(args.out) / 'measure.json'} and {Path(args.out) / 'measure.html'}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``sgdnoise measure``."""
    from .monitor import QUANTITIES

    p = sub.add_parser(
        "measure",
        help="measure Tr(HΣ), λ_max, B_simple, ... of your own model on your data",
        description="Measure the noise structure of your model at its weights, in eval mode: "
        "MODEL is MODULE:FACTORY (a dotted module or a .py path; FACTORY() returns an nn.Module "
        "or (model, loss_fn)); DATA is an .npz/.pt file with inputs and targets under the keys "
        "x/y or inputs/targets, or MODULE:FACTORY returning (inputs, targets), a Dataset or a "
        "DataLoader. Writes measure.json and measure.html into --out, progress on stderr. Exit "
        "code 2 for bad input.",
    )
    p.add_argument("--model", required=True, help="MODULE:FACTORY (MODULE dotted or a .py path)")
    p.add_argument(
        "--weights",
        default=None,
        help="a state_dict file, loaded with torch.load(weights_only=True)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="an .npz/.pt file with keys x/y or inputs/targets, or MODULE:FACTORY",
    )
    p.add_argument("--batch-size", type=int, required=True, help="mini-batch size b of Σ_b")
    p.add_argument(
        "--quantities",
        nargs="+",
        default=None,
        metavar="Q",
        help=f"what to measure (default: all): {', '.join(QUANTITIES)}",
    )
    p.add_argument(
        "--loss",
        default=None,
        help="MODULE:FUNCTION, loss_fn(outputs, targets) -> mean loss (default: cross-entropy "
        "for integer targets, MSE for floating ones)",
    )
    p.add_argument("--out", default="measure-results", help="output folder (default: %(default)s)")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: auto, CUDA if available)",
    )
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float64"), help="cast the model to this dtype"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="estimate Tr(HΣ) from this many sampled examples (default: exact, all examples)",
    )
    p.add_argument(
        "--sigma", type=float, default=0.01, help="σ of the expected sharpness (default: 0.01)"
    )
    p.add_argument(
        "--sharpness-samples", type=int, default=100, help="sharpness draws (default: 100)"
    )
    p.add_argument(
        "--alignment-k", type=int, default=1, help="k of the eigenspace overlap (default: 1)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_measure)
