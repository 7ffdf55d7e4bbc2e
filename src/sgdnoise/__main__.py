"""``python -m sgdnoise``: the same as the ``sgdnoise`` command."""

from .cli import main

raise SystemExit(main())
