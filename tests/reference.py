"""Slow, obviously correct float64 references for the estimators (tests only)."""

from __future__ import annotations

import torch
from torch.func import functional_call
from torch.func import hessian as func_hessian

import sgdnoise


def dense_hessian(problem: sgdnoise.Problem) -> torch.Tensor:
    """∇²L(θ) by ``torch.func.hessian`` of the full-batch loss in one piece."""
    theta = problem.theta()

    def loss(t: torch.Tensor) -> torch.Tensor:
        state = {n: b for n, b in problem.model.named_buffers()}
        state.update({n: p for n, p in problem.model.named_parameters() if not p.requires_grad})
        state.update(problem.unflatten(t))
        loss = problem.loss_fn(
            functional_call(problem.model, state, (problem.inputs,)), problem.targets
        )
        return loss.mean()  # a per-sample vector (reduction="none") or already the mean

    return func_hessian(loss)(theta)


def loop_per_sample_gradients(problem: sgdnoise.Problem) -> torch.Tensor:
    """Per-sample gradients by a Python loop of ordinary backward passes."""
    model = problem.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(problem.num_samples):
        out = model(problem.inputs[i : i + 1])
        loss = problem.loss_fn(out, problem.targets[i : i + 1])
        grads = torch.autograd.grad(loss, trainable)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def dense_sigma(problem: sgdnoise.Problem, b: int = 1, replacement: bool = True) -> torch.Tensor:
    """Σ_b by explicit centring: (1/N) Σ (g_i − ḡ)(g_i − ḡ)ᵀ times the batch factor."""
    G = loop_per_sample_gradients(problem)
    N = G.shape[0]
    C = G - G.mean(0, keepdim=True)
    S1 = C.T @ C / N
    return S1 / b if replacement else S1 * (N - b) / (b * (N - 1))


def dense_hessian_reverse(problem: sgdnoise.Problem) -> torch.Tensor:
    """∇²L(θ) by ``torch.autograd.functional.hessian`` (reverse-over-reverse).

    Use this where ``torch.func.hessian`` (forward-over-reverse over all D directions) is not
    trustworthy: on ``nn.TransformerEncoderLayer`` it returns an asymmetric, run-dependent matrix
    (torch 2.13, CPU, math attention kernel), while finite differences agree with this one.
    """
    state = {n: b for n, b in problem.model.named_buffers()}
    state.update({n: p for n, p in problem.model.named_parameters() if not p.requires_grad})

    def loss(t: torch.Tensor) -> torch.Tensor:
        full = dict(state)
        full.update(problem.unflatten(t))
        out = functional_call(problem.model, full, (problem.inputs,))
        return problem.loss_fn(out, problem.targets).mean()

    return torch.autograd.functional.hessian(loss, problem.theta())
