"""The experiments of the paper, one registry entry each (:class:`~._protocol.Experiment`).

``sgdnoise <name>``, ``sgdnoise reproduce``, ``plot``, ``list`` and the report iterate
:data:`EXPERIMENTS`; nothing else lists the experiments. Each module keeps ``run(config, out, *,
device, progress, profile) -> results`` and a configuration declared once
(:func:`~._protocol.experiment_config`); the entries name their presentation (the summary and
figures in :mod:`sgdnoise.figures`, the claims in :mod:`sgdnoise.report`) as ``"module:function"``
strings imported on use, so this package imports neither.
"""

from __future__ import annotations

from . import fashion, indicator, prop1, toy
from ._protocol import Experiment

__all__ = ["EXPERIMENTS", "Experiment"]


#: Every experiment, in the order ``sgdnoise reproduce`` runs them.
EXPERIMENTS: dict[str, Experiment] = {
    "toy": Experiment(
        name="toy",
        help="2-D escape from a sharp minimum: GD and every GLD noise structure (poster Fig. 1).",
        description="Run GD and the GLD noise structures from the sharp minimum of the 2-D toy "
        "loss, all runs vectorised, and report how often each reaches the flat basin (with 95% "
        "Wilson intervals) next to Tr(HΣ). Precedence: --profile < --config < explicit flags.",
        title="Fig. 1 — 2-D toy: escaping the sharp minimum",
        config=toy.ToyConfig,
        presets=toy.PRESETS,
        run=toy.run,
        summary="sgdnoise.figures.toy:summary",
        figures="sgdnoise.figures.toy:plot",
        claims="sgdnoise.report.toy:claims",
        cost={"smoke": "3 s", "quick": "10 s", "paper": "10 s"},
        signature=("trajectories.json", "surface.json"),
    ),
    "indicator": Experiment(
        name="indicator",
        help="Tr(HΣ) against Tr(HΣ̄) on one-hidden-layer networks (poster Fig. 4 left; Prop. 2).",
        description="Train one-hidden-layer ReLU networks (fixed ±1 output weights, clipped "
        "output, MSE) as the released code does and record, after every epoch, the exact escape "
        "indicator Tr(HΣ) of SGD's noise (mini-batch 10) against its isotropic equivalent "
        "Tr(HΣ̄), their ratio and Proposition 1's alignment coefficient a; plus a δ sweep for "
        "Proposition 2. Precedence: --profile < --config < explicit flags.",
        title="Fig. 4 (left) — the escape indicator on one-hidden-layer networks",
        config=indicator.IndicatorConfig,
        presets=indicator.PRESETS,
        run=indicator.run,
        summary="sgdnoise.figures.indicator:summary",
        figures="sgdnoise.figures.indicator:plot",
        claims="sgdnoise.report.indicator:claims",
        cost={"smoke": "10 s", "quick": "1 min", "paper": "2 min"},
        signature=("analysis.json",),
    ),
    "prop1": Experiment(
        name="prop1",
        help="Proposition 1 numerically: the ratio against a·D/(k + D^(1−d))², slope against 2d − 1.",
        description="Build synthetic PSD Hessians with k large eigenvalues and a tail below "
        "λ₁D^(−d), and noise covariances aligned with them with coefficient a, for D over two "
        "decades and several d; compare Tr(HΣ)/Tr(HΣ̄) with Proposition 1's bound and its "
        "log-log slope with 2d − 1 (always on the CPU in float64). Precedence: --profile < "
        "--config < explicit flags.",
        title="Proposition 1, numerically",
        config=prop1.Prop1Config,
        presets=prop1.PRESETS,
        run=prop1.run,
        summary="sgdnoise.figures.prop1:summary",
        figures="sgdnoise.figures.prop1:plot",
        claims="sgdnoise.report.prop1:claims",
        cost={"smoke": "3 s", "quick": "10 s", "paper": "10 s"},
    ),
    "fashion": Experiment(
        name="fashion",
        help="FashionMNIST with corrupted labels: every dynamics from the GD minimum (Fig. 2, 4 right).",
        description="Train the paper's CNN by full-batch GD on 1,200 FashionMNIST images (200 "
        "with random labels), then run every dynamics from the GD minimum and compare test "
        "accuracy, expected sharpness and the escape indicator Tr(HΣ) against Tr(HΣ̄). Rerunning "
        "the same command resumes. Precedence: --profile < --config < explicit flags.",
        title="Fig. 2 and Fig. 4 (right) — FashionMNIST with corrupted labels",
        config=fashion.FashionConfig,
        presets=fashion.PRESETS,
        run=fashion.run,
        summary="sgdnoise.figures.fashion:summary",
        figures="sgdnoise.figures.fashion:plot",
        claims="sgdnoise.report.fashion:claims",
        cost={
            "smoke": "40 s",
            "quick": "43 min per seed (2-core CPU)",
            "paper": "GPU; many hours on CPU",
        },
        data=True,
        signature=("seed_*",),
        distributed=True,
    ),
}
