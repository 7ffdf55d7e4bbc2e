"""Names the experiments share, importable from here until the issue-11 merge.

Run directories, progress and figure saving live in :mod:`sgdnoise.runs`; configuration files and
the command line in :mod:`sgdnoise.experiments._protocol`.
"""

from __future__ import annotations

# ISSUE11-MERGE: re-exports kept so H2/H3 code importing from _common keeps working; the
# integrator may switch those imports to sgdnoise.runs / ._protocol and drop this module.
from ..runs import (  # noqa: F401
    COMPLETE,
    Progress,
    RunDir,
    check_memory,
    config_diff,
    config_identity,
    env_info,
    load_toml_config,
    notice,
    quarantine,
    resolve_device,
    resolve_dtype,
    save_figure,
    wilson_interval,
)
from ._protocol import replace_config  # noqa: F401
