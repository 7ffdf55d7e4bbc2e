"""Noise structures: gradient-level noise ``n`` for ``θ ← θ − η(∇L(θ) + n)``, one class per structure.

``noise_model(name, problem, batch_size=b, **options)`` builds one, ``noise_structures()`` lists the
names. Registered (in this order): ``const``, ``dynamic``, ``diag``, ``leading``, ``hessian``,
``hessian_top1``, ``full``, ``multiplicative``. See :mod:`sgdnoise.noise._base` for the interface.
"""

from ._base import (
    BatchedStatistics,
    NoiseModel,
    noise_class,
    noise_model,
    noise_structures,
    register_noise,
)
from ._gradients import per_sample_gradients_and_losses, weighted_gradients
from .const import ConstNoise
from .diag import DiagNoise
from .dynamic import DynamicNoise
from .full import FullNoise
from .hessian import HessianNoise, HessianTop1Noise
from .leading import LeadingNoise, safe_eigh
from .multiplicative import MultiplicativeNoise

__all__ = [
    "BatchedStatistics",
    "ConstNoise",
    "DiagNoise",
    "DynamicNoise",
    "FullNoise",
    "HessianNoise",
    "HessianTop1Noise",
    "LeadingNoise",
    "MultiplicativeNoise",
    "NoiseModel",
    "noise_class",
    "noise_model",
    "noise_structures",
    "per_sample_gradients_and_losses",
    "register_noise",
    "safe_eigh",
    "weighted_gradients",
]
