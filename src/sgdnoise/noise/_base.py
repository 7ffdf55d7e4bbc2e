"""The noise-structure interface and its registry.

A *noise structure* describes gradient-level noise ``n`` added to the full-batch gradient,

    θ ← θ − η (∇L(θ) + n),     so the parameter-level covariance of one step is η² Cov(n),

built from a :class:`~sgdnoise.Problem` (at its current θ) and the mini-batch size b whose SGD
noise covariance ``Σ_b`` it imitates (``Σ_1 = (1/N) Σ_i c_i c_iᵀ``, ``c_i = g_i − ḡ``;
``Σ_b = Σ_1 / b`` with replacement, ``Σ_1 (N − b)/(b (N − 1))`` without).

Every structure is one small class registered under a name; :func:`noise_model` builds one and
:func:`noise_structures` lists the names. An instance exposes

* ``covariance`` — ``Cov(n)`` as a matrix-free :class:`~sgdnoise.linalg.LinearOperator`;
* ``sample(num, *, generator)`` — ``[num, D]`` independent draws;
* ``refresh(problem=None, *, per_sample=None)`` — rebuild at the problem's current θ (eigen
  solvers warm-start from the previous refresh);
* for Gaussian structures, ``unit_dim`` r and ``transform(z)``: ``sample`` draws ``z ~ N(0, I_r)``
  rows from the generator and returns ``transform(z)`` = rows ``L z`` with ``L Lᵀ = Cov(n)``;
* ``config`` — a dict that rebuilds the same structure via ``noise_model(**config)``.

A class also declares what the dynamics and the experiments need, so that registering it is the
only step: ``label`` (legend and report name), ``family`` (``"aligned"``: shaped like SGD's noise
or the curvature, the poster's claim; ``"isotropic"``: not), ``default_refresh`` (covariance
refresh period in steps), ``experiment_options`` (which experiment settings feed which option),
:meth:`NoiseModel.noisy_gradient` (how a step's ``∇L + n`` is formed) and
:meth:`NoiseModel.batched_factor` (the ``[R, D, r]`` factors of R small problems at once, for the
2-D experiment).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._utils import randn, resolve_generator
from ..linalg.covariance import GradientNoiseCovariance, batch_scale
from ..linalg.operators import LinearOperator
from ..problem import Problem

__all__ = [
    "BatchedStatistics",
    "NoiseModel",
    "noise_class",
    "noise_model",
    "noise_structures",
    "register_noise",
]

_REGISTRY: dict[str, type[NoiseModel]] = {}


@dataclass(frozen=True)
class BatchedStatistics:
    """Gradient statistics of R independent small problems at one point each (batched).

    Attributes:
        centered: centred per-sample gradients ``c_i = g_i − ḡ`` ``[R, N, D]`` of each problem.
        hessian: the mean Hessian ``[R, D, D]`` of each problem (``None`` when not computed; only
            structures with ``batched_needs_hessian`` read it).
    """

    centered: torch.Tensor
    hessian: torch.Tensor | None = None

    def second_moment(self) -> torch.Tensor:
        """``Σ_1 = (1/N) Σ_i c_i c_iᵀ`` ``[R, D, D]`` (divisor N).

        For D = 2 three reductions (bmm is slow for 2×2 blocks), otherwise ``Cᵀ C / N``.
        """
        C = self.centered
        if C.shape[-1] != 2:
            return C.transpose(1, 2) @ C / C.shape[1]
        c0, c1 = C[..., 0], C[..., 1]
        s00, s01, s11 = (c0 * c0).mean(1), (c0 * c1).mean(1), (c1 * c1).mean(1)
        return torch.stack((torch.stack((s00, s01), -1), torch.stack((s01, s11), -1)), -2)


def scaled_top_eigen_factor(M: torch.Tensor, trace: float, k: int) -> torch.Tensor:
    """Factor ``[R, D, k]`` of ``T · M_k⁺ / Tr M_k⁺`` for symmetric ``M`` ``[R, D, D]``.

    ``M_k⁺`` keeps the k algebraically largest eigenpairs with negative eigenvalues clipped to 0;
    a run whose clipped eigenvalues are all 0 gets a zero factor.
    """
    vals, vecs = torch.linalg.eigh(M)  # ascending
    vals, vecs = vals.flip(-1)[..., :k].clamp_min(0), vecs.flip(-1)[..., :k]
    total = vals.sum(-1, keepdim=True)
    s = torch.where(total > 0, vals / total.clamp_min(torch.finfo(M.dtype).tiny), 0.0) * trace
    return vecs * s.sqrt()[..., None, :]


def _describe_options(cls: type[NoiseModel]) -> str:
    if not cls.option_defaults:
        return "none"
    return ", ".join(f"{k} (default {v!r})" for k, v in cls.option_defaults.items())


class NoiseModel(ABC):
    """Base class of the registered noise structures (see the module docstring).

    Subclasses set ``name``, ``label``, ``family``, ``default_refresh``, ``option_defaults``
    (option name → default; the only accepted options), optionally ``experiment_options`` and
    ``_check_option(name, value)`` for value checks, and implement ``_refresh(per_sample)`` (which
    must set ``self.covariance``), ``unit_dim``, ``transform(z)`` and ``batched_factor``.

    Attributes:
        problem: the :class:`~sgdnoise.Problem` of the last refresh.
        batch_size: b. replacement: whether Σ_b is for mini-batches drawn with replacement.
        scale: s with ``Σ_b = s Σ_1`` (:func:`~sgdnoise.batch_scale`).
        options: the resolved options (defaults filled in).
        theta: θ ``[D]`` at the last refresh. num_refreshes: refreshes so far.
        covariance: ``Cov(n)`` at the last refresh.
        sigma_trace: ``Tr Σ_b`` at the last refresh (``None`` for structures that do not need it).
    """

    name: ClassVar[str] = ""
    #: legend / report label of the dynamics ``gld_<name>`` (e.g. ``"GLD Hessian"``).
    label: ClassVar[str] = ""
    #: ``"aligned"`` (shaped like SGD's noise or the curvature: the poster's claim is that these
    #: escape sharp minima) or ``"isotropic"`` (the comparison side).
    family: ClassVar[str] = "aligned"
    #: covariance refresh period (steps) of the released code; experiments start from it.
    default_refresh: ClassVar[int] = 1
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: option → experiment setting(s) it is read from (the first present attribute wins), e.g.
    #: ``{"sigma": ("const_sigma",)}``; see :meth:`options_from`.
    experiment_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: whether :meth:`batched_factor` reads ``BatchedStatistics.hessian``.
    batched_needs_hessian: ClassVar[bool] = False
    #: whether a refresh uses the per-sample gradients (so an optimizer can pass them in).
    needs_per_sample: ClassVar[bool] = True
    #: whether the noise is Gaussian, ``n = L z`` with ``z ~ N(0, I_r)`` (``transform`` exists).
    gaussian: ClassVar[bool] = True
    #: whether :meth:`noisy_gradient` forms ``∇L + n`` itself (GLD then takes no separate pass).
    forms_gradient: ClassVar[bool] = False

    covariance: LinearOperator

    def __init__(
        self,
        problem: Problem,
        batch_size: int = 1,
        *,
        replacement: bool = True,
        per_sample: torch.Tensor | None = None,
        warm_state: Mapping[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> None:
        self._setup(problem, batch_size, replacement, warm_state, options)
        self.refresh(problem, per_sample=per_sample)

    @classmethod
    def unrefreshed(
        cls,
        problem: Problem,
        batch_size: int = 1,
        *,
        replacement: bool = True,
        warm_state: Mapping[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> NoiseModel:
        """The structure as the constructor builds it, before its first :meth:`refresh` (which
        the caller must run before anything else): lets :class:`~sgdnoise.BatchedEngine` find
        the eigenpairs of a first refresh in lock-step with other members (``find_pairs``)."""
        model = cls.__new__(cls)
        model._setup(problem, batch_size, replacement, warm_state, options)
        return model

    def _setup(
        self,
        problem: Problem,
        batch_size: int,
        replacement: bool,
        warm_state: Mapping[str, torch.Tensor] | None,
        options: Mapping[str, Any],
    ) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(
                f"noise structure {self.name!r} needs a sgdnoise.Problem, got {type(problem).__name__}"
            )
        self.scale = batch_scale(problem.num_samples, batch_size, replacement)
        self.batch_size = batch_size
        self.replacement = bool(replacement)
        self.options = self.resolve_options(options)
        self.problem = problem
        self.num_refreshes = 0
        self.sigma_trace: torch.Tensor | None = None
        self._overwrite = False  # True only inside refresh(..., overwrite_per_sample=True)
        if warm_state:
            self.set_warm_state(warm_state)

    # ------------------------------------------------------------------ options
    @classmethod
    def resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated with ``options``, each value checked.

        Raises:
            TypeError: an option the structure does not have (the message lists the valid ones).
            ValueError: a bad value (from ``_check_option``).
        """
        unknown = sorted(set(options) - set(cls.option_defaults))
        if unknown:
            raise TypeError(
                f"noise structure {cls.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {_describe_options(cls)}"
            )
        resolved = dict(cls.option_defaults)
        resolved.update(options)
        for key, value in resolved.items():
            cls._check_option(key, value)
        return resolved

    @classmethod
    def _check_option(cls, key: str, value: Any) -> None:
        """Raise ``ValueError`` for a bad option value (subclasses may override; default: any)."""
        return None

    @classmethod
    def options_from(cls, settings: Any) -> dict[str, Any]:
        """The options an experiment's settings give this structure.

        Args:
            settings: any object (an experiment config); for each option in
                ``experiment_options`` the first of its attribute names that ``settings`` has is
                read.

        Returns:
            ``{option: value}`` for the options found (defaults fill in the rest when built).
        """
        out: dict[str, Any] = {}
        for option, fields in cls.experiment_options.items():
            for field in fields:
                if hasattr(settings, field):
                    out[option] = getattr(settings, field)
                    break
        return out

    @staticmethod
    def _positive_int(cls_name: str, key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"noise structure {cls_name!r}: option {key} must be a positive int, got {value!r}"
            )

    @property
    def config(self) -> dict[str, Any]:
        """``{"name", "batch_size", "replacement", **options}``: ``noise_model(problem=..., **config)``
        rebuilds the same structure."""
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "replacement": self.replacement,
            **self.options,
        }

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (
            f"{type(self).__name__}(name={self.name!r}, D={self.problem.dim}, "
            f"batch_size={self.batch_size}, replacement={self.replacement}"
            + (f", {opts}" if opts else "")
            + f", refreshes={self.num_refreshes})"
        )

    # ------------------------------------------------------------------ refresh
    def refresh(
        self,
        problem: Problem | None = None,
        *,
        per_sample: torch.Tensor | None = None,
        overwrite_per_sample: bool = False,
    ) -> NoiseModel:
        """Rebuild the covariance at the problem's current θ (returns ``self``).

        Args:
            problem: a problem with the same D, dtype and device (default: the current one), e.g.
                the same model on new data.
            per_sample: the ``[N, D]`` per-sample gradients at the current θ if the caller already
                has them (an optimizer that also needs ``∇L = G.mean(0)``); saves a pass. Without
                them Σ_b is stored or streamed by the rule of
                :func:`~sgdnoise.gradient_noise_covariance` (``N·D ≤ MATERIALIZE_LIMIT``).
            overwrite_per_sample: the structure may centre ``per_sample`` in place and keep it
                (saves an ``[N, D]`` copy); the caller must not use it afterwards except to
                overwrite it before the next refresh (what :class:`~sgdnoise.GLD` does).
        """
        problem = self.problem if problem is None else problem
        if problem is not self.problem:
            old = self.problem
            if (problem.dim, problem.dtype, problem.device) != (old.dim, old.dtype, old.device):
                raise ValueError(
                    f"refresh needs a problem with the same D, dtype and device as before "
                    f"(D={old.dim}, {old.dtype}, {old.device}); got D={problem.dim}, "
                    f"{problem.dtype}, {problem.device}. Build a new noise model instead."
                )
            self.scale = batch_scale(problem.num_samples, self.batch_size, self.replacement)
            self.problem = problem
        if per_sample is not None and per_sample.shape != (problem.num_samples, problem.dim):
            raise ValueError(
                f"per_sample must have shape [N, D] = [{problem.num_samples}, {problem.dim}], "
                f"got {list(per_sample.shape)}"
            )
        self.theta = problem.theta()
        self._overwrite = bool(overwrite_per_sample) and per_sample is not None
        try:
            self._refresh(per_sample)
        finally:
            self._overwrite = False
        self.num_refreshes += 1
        return self

    def warm_state(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """What the next refresh starts from (eigen solvers: the last eigenvectors), for
        checkpoints; ``{}`` for structures that rebuild from scratch. Pass it back with
        :meth:`set_warm_state` (or ``noise_model(..., warm_state=...)``) to continue exactly.
        ``copy=False`` returns the tensors themselves, a snapshot that costs nothing: a refresh
        rebinds them, it never changes them in place."""
        vecs = getattr(self, "eigenvectors", None)
        if vecs is None or not self.options.get("warm_start", False):
            return {}
        return {"eigenvectors": vecs.detach().clone() if copy else vecs.detach()}

    def set_warm_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`warm_state` (before a refresh)."""
        unknown = sorted(set(state) - {"eigenvectors"})
        if unknown:
            raise ValueError(f"unknown warm-state entries {unknown}; expected 'eigenvectors'")
        if "eigenvectors" in state:
            p = self.problem
            vecs = state["eigenvectors"]
            if vecs.ndim != 2 or vecs.shape[0] != p.dim:
                raise ValueError(
                    f"warm-state eigenvectors must have shape [D, k] with D = {p.dim}, got "
                    f"{list(vecs.shape)}"
                )
            self.eigenvectors = vecs.to(device=p.device, dtype=p.dtype)

    @abstractmethod
    def _refresh(self, per_sample: torch.Tensor | None) -> None:
        """Rebuild ``self.covariance`` (and the sampling state) at ``self.problem``'s θ."""

    def _sigma(
        self, per_sample: torch.Tensor | None, *, materialize: bool | None = None
    ) -> GradientNoiseCovariance:
        """``Σ_b`` at the current θ (from ``per_sample`` when given); records ``sigma_trace``."""
        if per_sample is not None:
            cov = GradientNoiseCovariance(
                self.problem,
                self.batch_size,
                self.replacement,
                per_sample=per_sample,
                overwrite_per_sample=self._overwrite,
            )
        else:
            cov = GradientNoiseCovariance(
                self.problem, self.batch_size, self.replacement, materialize=materialize
            )
        self.sigma_trace = cov.trace()
        return cov

    # ------------------------------------------------------------------ sampling
    @property
    @abstractmethod
    def unit_dim(self) -> int:
        """r, the number of standard normal numbers per draw."""

    @abstractmethod
    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """Rows ``L z_j`` for ``z`` ``[num, r]`` with ``L Lᵀ = covariance`` (Gaussian structures)."""

    def _check_num(self, num: int) -> int:
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"num must be a non-negative int (number of draws), got {num!r}")
        return num

    @classmethod
    @abstractmethod
    def batched_factor(
        cls, stats: BatchedStatistics, trace: float, options: Mapping[str, Any]
    ) -> torch.Tensor:
        """Factors ``L`` ``[R, D, r]`` of R problems at once, ``L Lᵀ`` of trace ``trace`` per run.

        ``L Lᵀ`` is the structure's covariance built from each run's statistics (with b = 1),
        rescaled to trace ``trace`` (the 2-D experiment fixes the parameter-level noise trace).

        Args:
            stats: the R runs' centred per-sample gradients (and mean Hessians).
            trace: T, the trace of every ``L Lᵀ``.
            options: the resolved options (:meth:`resolve_options`).

        Returns:
            ``[R, D, r]`` (r = the structure's rank, e.g. D or k).
        """

    def noisy_gradient(
        self, theta: torch.Tensor, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and ``∇L(θ) + n`` for one step, ``n`` a fresh draw (``(0-dim, [D])``).

        The default is one full-batch pass plus :meth:`sample`. :class:`~sgdnoise.GLD` calls it
        only for structures with ``forms_gradient`` (whose noise enters through the loss itself);
        for the others it adds :meth:`sample` to the gradient it already computed.

        Args:
            theta: θ ``[D]``. generator: the noise source.
        """
        loss, grad = self.problem.loss_and_gradient(theta)
        return loss, grad + self.sample(1, generator=generator)[0]

    def sample(
        self, num: int, *, seed: int | None = 0, generator: torch.Generator | int | None = None
    ) -> torch.Tensor:
        """``num`` independent noise vectors ``[num, D]`` (dtype and device of the problem).

        Gaussian structures draw ``z`` ``[num, r]`` from ``generator`` (on its device, then
        moved) and return ``transform(z)``; the same generator state gives the same noise.
        Without a generator, a fresh one seeded with ``seed`` (default 0) is used.

        Raises:
            ValueError: a negative ``num``. TypeError: a generator or seed of another type.
        """
        num = self._check_num(num)
        gen = resolve_generator(seed, generator)
        z = randn(
            (num, self.unit_dim),
            generator=gen,
            dtype=self.problem.dtype,
            device=self.problem.device,
        )
        return self.transform(z)


def register_noise(cls: type[NoiseModel]) -> type[NoiseModel]:
    """Class decorator: register a :class:`NoiseModel` subclass under ``cls.name``.

    Raises:
        ValueError: the name is empty or taken, the label is empty, the family is not
            ``"aligned"``/``"isotropic"``, ``default_refresh`` is not a positive int, or a
            default in ``option_defaults`` fails the structure's own option check.
    """
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"noise structure name {cls.name!r} is empty or already registered")
    if not cls.label or cls.family not in ("aligned", "isotropic"):
        raise ValueError(
            f"noise structure {cls.name!r} must declare a label and a family 'aligned' or "
            f"'isotropic', got label={cls.label!r}, family={cls.family!r}"
        )
    NoiseModel._positive_int(cls.name, "default_refresh", cls.default_refresh)
    try:  # the declared defaults must pass the structure's own checks: fail at import, not mid-run
        cls.resolve_options({})
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"noise structure {cls.name!r}: a default option is invalid: {exc}"
        ) from exc
    _REGISTRY[cls.name] = cls
    return cls


#: The order in which :func:`noise_structures` lists the built-in structures.
_CANONICAL_ORDER = (
    "const",
    "dynamic",
    "diag",
    "leading",
    "hessian",
    "hessian_top1",
    "full",
    "multiplicative",
)


def noise_structures() -> tuple[str, ...]:
    """The names of the registered noise structures (built-ins first, then in registration order).

    Returns:
        A tuple of names, e.g. ``("const", "dynamic", "diag", …)``; each is a valid ``name`` of
        :func:`noise_model` and, prefixed with ``gld_``, a dynamics of :func:`make_optimizer`.
        Never raises.
    """
    first = [n for n in _CANONICAL_ORDER if n in _REGISTRY]
    return tuple(first + [n for n in _REGISTRY if n not in _CANONICAL_ORDER])


def noise_class(name: str) -> type[NoiseModel]:
    """The class registered under ``name`` (``ValueError`` listing the valid names otherwise)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown noise structure {name!r}; valid names: {', '.join(noise_structures())}"
        )
    return _REGISTRY[name]


def noise_model(
    name: str,
    problem: Problem,
    batch_size: int = 1,
    *,
    replacement: bool = True,
    per_sample: torch.Tensor | None = None,
    warm_state: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> NoiseModel:
    """Build the noise structure ``name`` for ``problem`` at its current θ.

    Args:
        name: one of :func:`noise_structures` — ``const`` (σ²I), ``dynamic`` (Tr Σ_b / D · I),
            ``diag`` (diag Σ_b), ``leading`` (top-k of Σ_b), ``hessian`` (top-k of H rescaled to
            Tr Σ_b), ``hessian_top1`` (Tr Σ_b · u₁u₁ᵀ), ``full`` (Σ_b exactly), ``multiplicative``
            (random per-example loss weights whose gradient noise has covariance Σ_b).
        problem: model, loss and data.
        batch_size: b, the mini-batch size whose SGD noise ``Σ_b`` is imitated.
        replacement: whether that mini-batch is drawn with replacement.
        per_sample: precomputed per-sample gradients ``[N, D]`` at the current θ (optional).
        warm_state: a :meth:`NoiseModel.warm_state` to start the first refresh from (resuming).
        **options: structure options (see each class; unknown ones raise ``TypeError``).

    Returns:
        The structure (a :class:`NoiseModel`), refreshed at the problem's current θ.

    Raises:
        ValueError: an unknown name (the registered ones are listed), a bad batch size or option
            value. TypeError: an option the structure does not have, or not a Problem.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import sgdnoise
        >>> g = torch.Generator().manual_seed(0)
        >>> model = nn.Linear(3, 1).double()
        >>> x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(16, 1, generator=g, dtype=torch.float64)
        >>> problem = sgdnoise.Problem(model, nn.functional.mse_loss, x, y)
        >>> noise = sgdnoise.noise_model("diag", problem, batch_size=4)
        >>> noise.sample(5, generator=g).shape
        torch.Size([5, 4])
        >>> bool(torch.isclose(noise.covariance.trace(), noise.sigma_trace))
        True
    """
    return noise_class(name)(
        problem,
        batch_size,
        replacement=replacement,
        per_sample=per_sample,
        warm_state=warm_state,
        **options,
    )
