"""Adding a noise structure is one file plus its import (issue 11, item 2).

A throw-away structure is written to a temporary module and imported; with no other edit it
must work in ``make_optimizer``, pass the noise contract checks, run in the 2-D experiment and in
the FashionMNIST smoke profile (on fake data), and appear in the report under its own label.
Registering is undone after each in-process test; the end-to-end run imports the module in a
subprocess (as the package would import a new structure: before the experiments).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sgdnoise
from sgdnoise.noise import _base

SOURCE = textwrap.dedent(
    '''
    """``throwaway``: isotropic noise with a fraction of SGD's magnitude (a test structure)."""

    import math

    import torch

    from sgdnoise.linalg.operators import ScaledIdentityOperator
    from sgdnoise.noise import NoiseModel, register_noise


    @register_noise
    class ThrowawayNoise(NoiseModel):
        """``Cov(n) = f · Tr Σ_b / D · I``."""

        name = "throwaway"
        label = "GLD throw-away"
        family = "isotropic"
        default_refresh = 5
        option_defaults = {"fraction": 0.5}
        experiment_options = {"fraction": ("throwaway_fraction",)}

        @classmethod
        def _check_option(cls, key, value):
            if key == "fraction" and not 0 < value <= 1:
                raise ValueError(f"option fraction must be in (0, 1], got {value!r}")

        def _refresh(self, per_sample):
            p = self.problem
            trace = self._sigma(per_sample).trace()
            self._variance = trace / p.dim * self.options["fraction"]
            self.covariance = ScaledIdentityOperator(
                self._variance, p.dim, dtype=p.dtype, device=p.device
            )

        @property
        def unit_dim(self):
            return self.problem.dim

        def transform(self, z):
            return z * self._variance.sqrt()

        @classmethod
        def batched_factor(cls, stats, trace, options):
            R, _, D = stats.centered.shape
            C = stats.centered
            eye = torch.eye(D, dtype=C.dtype, device=C.device) * math.sqrt(trace / D)
            return eye.expand(R, D, D)
    '''
)


def _write_module(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "throwaway_noise.py").write_text(SOURCE)


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """Import the throw-away module; afterwards the registry and sys.modules are as before."""
    _write_module(tmp_path / "mod")
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    before = dict(_base._REGISTRY)
    try:
        yield importlib.import_module("throwaway_noise")
    finally:
        _base._REGISTRY.clear()
        _base._REGISTRY.update(before)
        sys.modules.pop("throwaway_noise", None)


def test_registered_everywhere_and_undone(throwaway):
    assert "throwaway" in sgdnoise.noise_structures()
    assert "gld_throwaway" in sgdnoise.dynamics_names()
    assert sgdnoise.optim.dynamics_label("gld_throwaway") == "GLD throw-away"
    assert sgdnoise.optim.dynamics_family("gld_throwaway") == "isotropic"
    assert sgdnoise.optim.default_refresh("gld_throwaway") == 5
    with pytest.raises(ValueError, match="fraction must be in"):
        throwaway.ThrowawayNoise.resolve_options({"fraction": 2.0})


def test_registration_does_not_leak():
    assert "throwaway" not in sgdnoise.noise_structures()
    assert "throwaway_noise" not in sys.modules


def test_make_optimizer_and_contract(throwaway):
    import test_noise

    problem = test_noise.make_problem()
    opt = sgdnoise.make_optimizer("gld_throwaway", problem, 0.1, generator=0, batch_size=4,
                                  refresh_every=2, fraction=0.25)  # fmt: skip
    theta0 = problem.theta()
    sgdnoise.run_dynamics(opt, 3)
    assert opt.noise is not None and opt.noise.options["fraction"] == 0.25
    assert not torch.equal(problem.theta(), theta0)
    cov = opt.noise.covariance.to_dense()
    assert torch.allclose(torch.trace(cov), 0.25 * opt.noise.sigma_trace)
    problem64 = test_noise.make_problem()
    models64 = {"throwaway": test_noise.build("throwaway", problem64)}
    for dtype in (torch.float64, torch.float32):
        test_noise.test_contract("throwaway", dtype, models64, test_noise.make_problem(dtype))


def test_toy_fashion_and_report_without_edits(tmp_path):
    """One subprocess: import the new file, then the experiments and the report see it."""
    from fake_fashion import write_fashion

    _write_module(tmp_path / "mod")
    data = tmp_path / "data"
    write_fashion(data)
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import dataclasses, json, sys
        sys.path.insert(0, {str(tmp_path / "mod")!r})
        import throwaway_noise  # the one import a new structure needs
        from sgdnoise.cli import main

        assert main(["toy", "--profile", "smoke", "--runs", "4", "--steps", "10", "--dynamics",
                     "gd", "gld_throwaway", "--device", "cpu", "--no-progress",
                     "--out", {str(out / "toy")!r}]) == 0
        assert main(["fashion", "--profile", "smoke", "--dynamics", "gd", "gld_throwaway",
                     "--device", "cpu", "--data-dir", {str(data)!r}, "--no-progress",
                     "--out", {str(out / "fashion")!r}]) == 0
        from sgdnoise.report import write_report

        write_report({str(out)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    toy_res = json.loads((out / "toy" / "results.json").read_text())
    assert toy_res["gld_throwaway"]["label"] == "GLD throw-away"
    assert toy_res["gld_throwaway"]["tr_HS"] > 0
    fres = json.loads((out / "fashion" / "results.json").read_text())
    assert fres["gld_throwaway"]["label"] == "GLD throw-away"
    assert fres["meta"]["refresh_every"] == {"gld_throwaway": 5}
    assert (out / "fashion" / "fig2_test_acc.png").exists()
    report = (out / "report.md").read_text()
    assert report.count("GLD throw-away") >= 2  # the toy's and the fashion run's tables


def test_a_bad_default_option_is_refused_at_registration():
    """Declared defaults pass the structure's own check when it is registered, not mid-run."""
    from sgdnoise.noise import NoiseModel, register_noise

    class BadDefault(NoiseModel):
        name = "bad_default"
        label = "GLD bad default"
        family = "isotropic"
        option_defaults = {"fraction": 2.0}  # noqa: RUF012

        @classmethod
        def _check_option(cls, key, value):
            if not 0 < value <= 1:
                raise ValueError(f"option fraction must be in (0, 1], got {value!r}")

    with pytest.raises(ValueError, match=r"'bad_default': a default option is invalid: .*\(0, 1\]"):
        register_noise(BadDefault)
    assert "bad_default" not in sgdnoise.noise_structures()
