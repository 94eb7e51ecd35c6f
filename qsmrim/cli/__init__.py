"""One module per subcommand; each defines ``add_parser(subparsers)`` and ``run(args)``."""


def add_no_progress(parser) -> None:
    """The ``--no-progress`` flag every long-running subcommand shares."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (batch jobs, logs)")


def picklable_options(args):
    """``args`` without the parser's own ``_`` entries, for worker processes.

    The subcommand module held there does not pickle; the options themselves do.
    """
    import argparse

    return argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
