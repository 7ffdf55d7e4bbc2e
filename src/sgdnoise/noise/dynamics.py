"""Dynamics names and what the noise-structure registry says about them.

``"gd"``, ``"sgd"`` and ``"gld_<structure>"`` for every registered structure; the label, family
(which side of the poster's aligned-vs-isotropic comparison) and default covariance refresh come
from the structure's class, so every list of dynamics in the experiments, figures and report is
derived here, at call time.
"""

from __future__ import annotations

from ._base import NoiseModel, noise_class, noise_structures

__all__ = ["default_refresh", "dynamics_family", "dynamics_label", "dynamics_names"]


def dynamics_names() -> tuple[str, ...]:
    """``("gd", "sgd", "gld_const", "gld_dynamic", …)`` — every name :func:`make_optimizer` accepts.

    Read from the noise-structure registry at call time: a structure registered later appears.

    Returns:
        ``("gd", "sgd", *("gld_" + s for s in noise_structures()))``; never raises.
    """
    return ("gd", "sgd", *(f"gld_{s}" for s in noise_structures()))


def _structure(dynamics: str) -> type[NoiseModel] | None:
    """The structure class of ``gld_<name>``; ``None`` for gd/sgd; ``ValueError`` otherwise."""
    if dynamics in ("gd", "sgd"):
        return None
    if not isinstance(dynamics, str) or not dynamics.startswith("gld_"):
        names = ", ".join(dynamics_names())
        raise ValueError(f"unknown dynamics {dynamics!r}; valid names: {names}")
    return noise_class(dynamics[len("gld_") :])


def dynamics_label(dynamics: str) -> str:
    """The legend / report label: ``"GD"``, ``"SGD"`` or the structure's ``label``.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    cls = _structure(dynamics)
    return {"gd": "GD", "sgd": "SGD"}[dynamics] if cls is None else cls.label


def dynamics_family(dynamics: str) -> str:
    """Which side of the poster's claim a dynamics is on.

    Returns:
        ``"none"`` for GD (no noise), ``"aligned"`` for SGD (its own noise) and the structure's
        ``family`` (``"aligned"`` or ``"isotropic"``) for ``gld_<structure>``.

    Raises:
        ValueError: an unknown name.
    """
    cls = _structure(dynamics)
    if cls is None:
        return "none" if dynamics == "gd" else "aligned"
    return cls.family


def default_refresh(dynamics: str) -> int:
    """The covariance refresh period (steps) a dynamics starts from: 0 for gd/sgd (nothing to
    refresh), else the structure's ``default_refresh`` (the released code's periods).

    Raises:
        ValueError: an unknown name.
    """
    cls = _structure(dynamics)
    return 0 if cls is None else cls.default_refresh
