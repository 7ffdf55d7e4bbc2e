"""Fast per-sample gradients for networks built from ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers.

One ordinary forward pass records each layer's input ``a`` and output ``z``; one backward pass of
the *summed* loss gives ``∂(Σ_j ℓ_j)/∂z``, whose slice for sample i is ``∂ℓ_i/∂z_i`` (samples are
independent). A layer's per-sample weight gradient is then a small contraction per sample:

* Linear: ``∇_W ℓ_i = Σ_t δ_{i,t} a_{i,t}ᵀ`` (t runs over any extra leading positions);
* Conv: ``∇_W ℓ_i`` is the correlation of the padded input ``a_i`` with ``δ_i`` (stride and
  dilation swap roles), computed for all samples at once as one grouped convolution.

This costs about one forward + one backward + one extra contraction, instead of vmap's batched
per-sample backward, which is several times slower for convolutions on a CPU.

**When the fast path is used** (the rule; everything else goes through ``torch.func.vmap``):

1. every trainable parameter is the ``weight`` or ``bias`` of a layer whose type is exactly
   ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (zero padding mode; any stride, padding, dilation and
   groups), and no parameter is registered under two names (tied weights);
2. the dtype is float32 or float64;
3. at run time, checked on every pass: each such layer is called exactly once per forward, its
   input and output have the batch on dimension 0, and neither was changed in place afterwards
   (``ReLU(inplace=True)``, ``h += ...``: detected through the tensors' version counters);
4. once per :class:`~sgdnoise.Problem`, on the first chunk: the sum of the per-sample gradients
   equals the gradient of the summed loss, and the first sample's row equals its gradient
   computed alone. This catches what the static rules cannot see (a parameter also used outside
   its layer, e.g. ``F.linear(h, enc.weight.t())`` or a penalty inside ``loss_fn``; a model that
   reorders the batch dimension).

When a check fails, the caller falls back to the general path and records why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ._data import batch_size_of, call_model

__all__ = ["HookFailure", "hook_plan", "per_sample_gradients_by_hooks"]

Plan = list[
    tuple[nn.Module, str]
]  # (layer, "weight" | "bias") for every trainable parameter, in θ order

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class HookFailure(str):
    """Why the fast path could not be used for a pass (a readable sentence naming the module)."""


def unsupported_reason(model: nn.Module, param_names: list[str]) -> str | None:
    """``None`` if the static rules (1) hold, else a sentence naming the first offending parameter."""
    modules = dict(model.named_modules())
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) in seen and seen[id(p)] != name:
            return f"parameter {seen[id(p)]} is also registered as {name} (tied weights)"
        seen.setdefault(id(p), name)
    for name in param_names:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None or leaf not in ("weight", "bias"):
            return f"parameter {name} is not the weight or bias of a layer"
        kind = type(module)
        if kind is nn.Linear:
            continue
        if kind not in _CONV:
            return f"parameter {name} belongs to {kind.__name__}, not Linear/Conv1d/2d/3d"
        if module.padding_mode != "zeros" or not hasattr(
            module, "_reversed_padding_repeated_twice"
        ):
            return f"{owner} ({kind.__name__}) uses padding_mode={module.padding_mode!r}"
    return None


def hook_plan(model: nn.Module, param_names: list[str]) -> Plan | None:
    """Map each trainable parameter (in θ order) to its layer, or ``None`` if rule 1 fails."""
    if unsupported_reason(model, param_names) is not None:
        return None
    modules = dict(model.named_modules())
    plan: Plan = []
    for name in param_names:
        owner, _, leaf = name.rpartition(".")
        plan.append((modules[owner], leaf))
    return plan


def per_sample_gradients_by_hooks(
    model: nn.Module,
    total_loss: Callable[[torch.Tensor], torch.Tensor],
    plan: Plan,
    x: Any,
    out: torch.Tensor,
    names: dict[int, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | HookFailure:
    """Per-sample gradients written into ``out`` ``[n, D]`` and the model's outputs ``[n, ...]``.

    ``total_loss(outputs)`` must return the *summed* loss ``Σ_i ℓ_i`` of the chunk. ``out`` may be
    a row slice of a larger matrix; it is filled in place and returned. Returns a
    :class:`HookFailure` (nothing usable was written) when a run-time rule (3) fails.
    """
    names = names or {}
    layers = list({id(m): m for m, _ in plan}.values())
    n = batch_size_of(x)
    got = _forward_and_deltas(model, total_loss, layers, x, n, names)
    if isinstance(got, str):
        return HookFailure(got)
    outputs, records, deltas = got
    _write_gradients(plan, layers, records, deltas, out, n)
    return out, outputs


_Records = dict[int, list[tuple[torch.Tensor, torch.Tensor, int, int]]]


def _forward_and_deltas(
    model: nn.Module,
    total_loss: Callable[[torch.Tensor], torch.Tensor],
    layers: list[nn.Module],
    x: Any,
    n: int,
    names: dict[int, str],
) -> tuple[Any, _Records, tuple[torch.Tensor | None, ...]] | str:
    """One forward pass recording each layer's input and output, and the backward to the
    outputs ``δ = ∂(Σ_i ℓ_i)/∂z``; or the reason the run-time rules (3) fail."""
    records: _Records = {id(m): [] for m in layers}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], z: torch.Tensor) -> None:
        a = args[0]
        records[id(module)].append((a, z, a._version, z._version))

    def label(m: nn.Module) -> str:
        return f"{names.get(id(m), '?')} ({type(m).__name__})"

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.enable_grad():
            outputs = call_model(model, x)
            for m in layers:
                calls = records[id(m)]
                if len(calls) != 1:
                    return f"layer {label(m)} was called {len(calls)} times per forward"
                a, z, va, vz = calls[0]
                if not isinstance(a, torch.Tensor) or a.ndim < 2 or a.shape[0] != n:
                    return f"layer {label(m)} does not see the batch on dimension 0"
                if z.shape[0] != n:
                    return f"layer {label(m)} does not output the batch on dimension 0"
            total = total_loss(outputs)
            for m in layers:
                a, z, va, vz = records[id(m)][0]
                if a._version != va or z._version != vz:
                    return (
                        f"the input or output of layer {label(m)} is modified in place after the "
                        "layer (e.g. ReLU(inplace=True) or h += ...)"
                    )
            zs = [records[id(m)][0][1] for m in layers]
            deltas = torch.autograd.grad(total, zs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return outputs, records, deltas


def _write_gradients(
    plan: Plan,
    layers: list[nn.Module],
    records: _Records,
    deltas: tuple[torch.Tensor | None, ...],
    out: torch.Tensor,
    n: int,
) -> None:
    """Per-sample weight and bias gradients of every planned layer into ``out``'s columns."""
    offsets: dict[tuple[int, str], slice] = {}
    start = 0
    for m, leaf in plan:
        size = getattr(m, leaf).numel()
        offsets[(id(m), leaf)] = slice(start, start + size)
        start += size

    def block(m: nn.Module, leaf: str) -> torch.Tensor | None:
        """The columns of ``out`` for this parameter, or ``None`` if it is frozen."""
        pos = offsets.get((id(m), leaf))
        return None if pos is None else out[:, pos]

    with torch.no_grad():
        for m, delta in zip(layers, deltas, strict=True):
            a, z = records[id(m)][0][0].detach(), records[id(m)][0][1]
            delta = torch.zeros_like(z) if delta is None else delta.detach()
            w_out, b_out = block(m, "weight"), block(m, "bias")
            if isinstance(m, nn.Linear):
                d2 = delta.reshape(n, -1, delta.shape[-1])
                a2 = a.reshape(n, -1, a.shape[-1])
                if w_out is not None:
                    target = w_out.view(n, d2.shape[2], a2.shape[2])
                    if d2.shape[1] == 1:  # the common case: one position per sample
                        torch.mul(d2[:, 0, :, None], a2[:, 0, None, :], out=target)
                    else:
                        torch.bmm(d2.transpose(1, 2), a2, out=target)
                if b_out is not None:
                    torch.sum(d2, dim=1, out=b_out)
            else:
                if w_out is not None:
                    _conv_weight_gradients(cast(_ConvNd, m), a, delta, w_out)
                if b_out is not None:
                    torch.sum(delta.flatten(2), dim=2, out=b_out)


def _conv_weight_gradients(
    m: _ConvNd, a: torch.Tensor, delta: torch.Tensor, w_out: torch.Tensor
) -> None:
    """Per-sample ``∇_W ℓ_i`` of a convolution, written into ``w_out`` ``[n, numel(W)]``.

    ``∇_W ℓ_i[o, c, κ] = Σ_p δ_i[o, p] · a_i[c, s·p + d·κ]`` (s stride, d dilation, a padded): a
    correlation of the inputs with the deltas as kernels, where the forward's stride becomes the
    dilation and its dilation the stride. All samples and groups at once: samples × groups are
    the groups of one convolution (channels first). Much faster on CPU than unfold/einsum.
    """
    conv = _CONV[type(m)]
    n, g = a.shape[0], m.groups
    a = (
        F.pad(a, m._reversed_padding_repeated_twice)
        if any(m._reversed_padding_repeated_twice)
        else a
    )
    C, O = a.shape[1], delta.shape[1]
    spatial_in, spatial_out = a.shape[2:], delta.shape[2:]
    kernel = m.kernel_size
    # input channels of group j for sample i become channel block (i·g + j): [C/g, n·g, *S]
    inp = a.reshape(n * g, C // g, *spatial_in).transpose(0, 1)
    kernels = delta.reshape(n * O, 1, *spatial_out).to(a.dtype)
    res = conv(inp, kernels, groups=n * g, stride=m.dilation, dilation=m.stride)
    crop = (slice(None), slice(None), *(slice(0, k) for k in kernel))
    res = res[crop]  # [C/g, n·O, *kernel]
    res = res.reshape(C // g, n, O, *kernel).transpose(0, 1).transpose(1, 2)  # [n, O, C/g, *k]
    w_out.view(n, O, C // g, *kernel).copy_(res)
