"""Synthetic data sets of the paper: the 2-D toy example (Sec. 3.1) and the one-hidden-layer task.

Random numbers are drawn on the generator's own device (normally a CPU generator) and then moved to
``device``, so a seed gives the same data on CPU and CUDA. Nothing touches the global RNG.
"""

from __future__ import annotations

import math

import torch

__all__ = ["TOY2D_ROTATION", "one_hidden_layer_data", "toy2d_data"]

_C = math.cos(math.pi / 4)

#: The rotation K = [[c, -s], [s, c]] with c = s = cos(π/4) used by the 2-D toy (row vector · K).
TOY2D_ROTATION: tuple[tuple[float, float], tuple[float, float]] = ((_C, -_C), (_C, _C))


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}. Pass e.g. "
            "generator=torch.Generator().manual_seed(0); sgdnoise never uses the global RNG."
        )
    return generator


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")


def toy2d_data(
    num_runs: int,
    num_points: int = 100,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Data of the 2-D toy example, one independent data set per run.

    Each point is the row vector ``x = 1e-2 · (z ⊙ (√10, 1)) · K`` with ``z ~ N(0, I₂)`` and
    ``K = [[c, -s], [s, c]]``, ``c = s = cos(π/4)``. Hence
    ``Cov(x) = 1e-4 · (10 u uᵀ + v vᵀ)`` with ``u = (1, -1)/√2`` and ``v = (1, 1)/√2``: the data
    spread most along (1, -1), so that at the sharp minimum (Hessian eigenvalue 200 along (1, 1),
    20 along (1, -1)) the per-sample gradient covariance ``H Cov(x) H`` has eigenvalue 4.0 along
    (1, 1) and 0.4 along (1, -1), i.e. SGD-like noise aligned with the sharp direction.

    Args:
        num_runs: number of independent data sets (the paper draws a new one per run).
        num_points: points per data set (the paper's N = 100).
        generator: source of randomness (draws happen on its device).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        Tensor ``[num_runs, num_points, 2]``.
    """
    num_runs = _check_positive_int(num_runs, "num_runs")
    num_points = _check_positive_int(num_points, "num_points")
    generator = _check_generator(generator)
    _check_float_dtype(dtype)
    z = torch.randn(
        (num_runs, num_points, 2), generator=generator, dtype=dtype, device=generator.device
    )
    scale = torch.tensor([math.sqrt(10.0), 1.0], dtype=dtype, device=generator.device)
    rotation = torch.tensor(TOY2D_ROTATION, dtype=dtype, device=generator.device)
    return (1e-2 * (z * scale) @ rotation).to(device)


def one_hidden_layer_data(
    num_points: int = 1000,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary task of the one-hidden-layer experiment (Proposition 2 / Fig. 4).

    ``x ~ U([-2, 2]²)`` and ``y = 1`` if ``x₁ ≥ x₂`` else ``0`` (about balanced classes).

    Args:
        num_points: number of points (the paper's numX = 1000).
        generator: source of randomness (draws happen on its device).
        dtype: floating dtype of ``x`` and ``y``.
        device: device of the results.

    Returns:
        ``(x, y)`` with ``x`` of shape ``[num_points, 2]`` and ``y`` of shape ``[num_points]``
        holding 0.0/1.0 in ``dtype`` (regression targets for the MSE loss).
    """
    num_points = _check_positive_int(num_points, "num_points")
    generator = _check_generator(generator)
    _check_float_dtype(dtype)
    x = torch.rand((num_points, 2), generator=generator, dtype=dtype, device=generator.device)
    x = 4.0 * x - 2.0
    y = (x[:, 0] >= x[:, 1]).to(dtype)
    return x.to(device), y.to(device)
