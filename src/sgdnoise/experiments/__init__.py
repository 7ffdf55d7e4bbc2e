"""One module per paper figure. Each exposes ``add_parser(subparsers)`` for the command line and a
``run(config, out_dir, ...)`` function; the CLI is a thin layer over them."""

#: Command-line experiments, in the order ``sgdnoise reproduce`` runs them.
EXPERIMENTS = ("toy", "indicator", "prop1", "fashion")
