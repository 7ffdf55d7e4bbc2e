"""The results of :func:`sgdnoise.check`: one :class:`CheckResult` per check, gathered in a
:class:`CheckReport` (prints as a short table), and the readable text of an exception."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckReport", "CheckResult"]


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome.

    Attributes:
        name: short identifier (``"hvp_finite_differences"``, ...).
        passed: ``True``/``False``, or ``None`` when the check was skipped (an earlier check that
            it needs failed, or too few samples).
        value: the measured number the check compares (a relative error, a count, the loss), or
            ``None`` when nothing was measured.
        tolerance: the threshold ``value`` was compared against (``None`` if not applicable).
        detail: one readable paragraph: what was measured, and for a failure by how much, the
            likely cause and the fix.
    """

    name: str
    passed: bool | None
    value: float | None
    tolerance: float | None
    detail: str

    @property
    def status(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"SKIP"``."""
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


@dataclass(frozen=True)
class CheckReport:
    """The outcome of :func:`check`: one :class:`CheckResult` per check, in the order run.

    Attributes:
        checks: the per-check records.
        problem: a one-line description of the problem checked.
        num_samples: how many samples the checks used (a random subset).
    """

    checks: list[CheckResult] = field(default_factory=list)
    problem: str = ""
    num_samples: int = 0

    @property
    def ok(self) -> bool:
        """``True`` when no check failed (skipped checks do not count as failures)."""
        return all(c.passed is not False for c in self.checks)

    @property
    def failures(self) -> list[str]:
        """One readable sentence per failed check: ``"name: what failed, by how much, fix"``."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.passed is False]

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        """The names of the checks, in the order run."""
        return [c.name for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary of the report."""
        return {
            "ok": self.ok,
            "problem": self.problem,
            "num_samples": self.num_samples,
            "checks": [
                {
                    "name": c.name,
                    "passed": c.passed,
                    "value": c.value,
                    "tolerance": c.tolerance,
                    "detail": c.detail,
                }
                for c in self.checks
            ],
        }

    def __str__(self) -> str:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3g}"

        width = max((len(c.name) for c in self.checks), default=4)
        lines = [f"sgdnoise.check: {self.problem} ({self.num_samples} samples checked)"]
        for c in self.checks:
            head = f"  {c.status}  {c.name:<{width}}  value {num(c.value):>9}  tol {num(c.tolerance):>9}"
            if c.passed is False:
                lines.append(head)
            else:
                lines.append(f"{head}  {c.detail}")
        failed = [c for c in self.checks if c.passed is False]
        if failed:
            lines.append(f"{len(failed)} of {len(self.checks)} checks failed:")
            lines.extend(f"  - {f}" for f in self.failures)
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- helpers
_HINTS = (
    (
        "random operation",
        "The model draws random numbers in its forward pass (dropout, noise, augmentation): "
        "call model.eval() or move the randomness out of the model.",
    ),
    (
        "derivative for",
        "An operation in the model has no derivative rule of the order needed: replace it, or "
        "run it on a kernel that has one (attention: the math kernel).",
    ),
    (
        "batching rule",
        "An operation has no torch.func (vmap) batching rule: replace it, or report the model "
        "so that its per-sample pass falls back to a loop over samples.",
    ),
)


def _exception_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if len(text) > 600:
        text = text[:600] + " ..."
    low = str(exc).lower()
    for key, hint in _HINTS:
        if key in low and hint not in text:
            return f"{text} {hint}"
    return text
