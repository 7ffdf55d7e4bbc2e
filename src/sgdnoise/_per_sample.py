"""Fast per-sample gradients for networks built from ``nn.Linear`` and ``nn.Conv2d`` layers.

One ordinary forward pass records each layer's input ``a`` and output ``z``; one backward pass of
the *summed* loss gives ``∂(Σ_j ℓ_j)/∂z``, whose slice for sample i is ``∂ℓ_i/∂z_i`` (samples are
independent). A layer's per-sample weight gradient is then a small contraction per sample:

* Linear: ``∇_W ℓ_i = Σ_t δ_{i,t} a_{i,t}ᵀ`` (t runs over any extra leading positions);
* Conv2d: ``∇_W ℓ_i = Σ_{positions} δ_i ⊗ patch(a_i)`` (a contraction over output positions).

This costs about one forward + one backward + one extra contraction, instead of vmap's batched
per-sample backward, which is several times slower for convolutions on a CPU. It is used when
every trainable parameter is the ``weight``/``bias`` of a supported layer called exactly once per
forward; otherwise :class:`~sgdnoise.Problem` falls back to ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

__all__ = ["hook_plan", "per_sample_gradients_by_hooks"]

Plan = list[
    tuple[nn.Module, str]
]  # (layer, "weight" | "bias") for every trainable parameter, in θ order


def _supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple)
        )
    return False


def hook_plan(model: nn.Module, param_names: list[str]) -> Plan | None:
    """Map each trainable parameter (in θ order) to its layer, or ``None`` if unsupported."""
    modules = dict(model.named_modules())
    plan: Plan = []
    for name in param_names:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if module is None or leaf not in ("weight", "bias") or not _supported(module):
            return None
        plan.append((module, leaf))
    return plan


def per_sample_gradients_by_hooks(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    plan: Plan,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample gradients ``[n, D]`` and losses ``[n]`` at the model's current parameters, or
    ``None`` if a layer was not called exactly once (shared layers): the caller then falls back
    to vmap. The losses come from the same forward pass (no second pass).

    ``out`` (``[n, D]``, may be a row slice of a larger matrix) receives the gradients in place,
    so that no concatenated copy is made; it is also what is returned.
    """
    layers = list({id(m): m for m, _ in plan}.values())
    inputs: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}
    outputs: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs[id(module)].append(args[0].detach())
        outputs[id(module)].append(out)

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(x)
            if any(len(v) != 1 for v in outputs.values()):
                return None
            n = x.shape[0]
            # The mean loss times n is Σ_i ℓ_i, whose gradient w.r.t. z_i is ∂ℓ_i/∂z_i.
            total = loss_fn(logits, y) * n
            zs = [outputs[id(m)][0] for m in layers]
            deltas = torch.autograd.grad(total, zs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    D = sum(getattr(m, leaf).numel() for m, leaf in plan)
    if out is None:
        first = getattr(plan[0][0], plan[0][1])
        out = torch.empty(n, D, dtype=first.dtype, device=first.device)
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
            a = inputs[id(m)][0]
            z = outputs[id(m)][0]
            if delta is None:
                delta = torch.zeros_like(z)
            delta = delta.detach()
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
                assert isinstance(m, nn.Conv2d)
                if w_out is not None:
                    # ∇_W ℓ_i[o, c, i, j] = Σ_{h,w} δ_i[o, h, w] · a_i[c, s·h + i, s·w + j]: a
                    # grouped convolution of the inputs (samples as channels) with the deltas as
                    # kernels, dilated by the stride. Much faster on CPU than unfold/einsum (which
                    # copies every patch).
                    ph, pw = m.padding
                    if ph or pw:
                        a = F.pad(a, (pw, pw, ph, ph))
                    (kh, kw), (sh, sw) = m.kernel_size, m.stride
                    O, Ho, Wo = delta.shape[1:]
                    kernels = delta.reshape(n * O, 1, Ho, Wo).to(a.dtype)
                    g = F.conv2d(a.transpose(0, 1), kernels, groups=n, dilation=(sh, sw))
                    g = g[:, :, :kh, :kw].reshape(a.shape[1], n, O, kh, kw)
                    w_out.view(n, O, a.shape[1], kh, kw).copy_(g.permute(1, 2, 0, 3, 4))
                if b_out is not None:
                    torch.sum(delta, dim=(2, 3), out=b_out)
    with torch.no_grad():
        losses = vmap(lambda o, t: loss_fn(o[None], t[None]))(logits.detach(), y)
    return out, losses
