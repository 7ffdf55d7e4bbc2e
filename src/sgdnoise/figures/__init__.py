"""Figures of the experiments, drawn from a run directory's saved results (matplotlib, lazily).

Each module ``sgdnoise.figures.<experiment>`` has ``plot(run_dir) -> list[Path]``.
"""
