"""Figures drawn from a finished run directory's saved results (matplotlib imported lazily).

One module per experiment, each with ``plot(run_dir) -> list[Path]``; shared drawing helpers in
:mod:`sgdnoise.figures._style`. The library imports without matplotlib; only drawing needs it
(``pip install 'sgdnoise[plot]'``).
"""
