"""One module per subcommand; each defines ``add_parser(subparsers)`` and ``run(args)``."""


def add_no_progress(parser) -> None:
    """The ``--no-progress`` flag every long-running subcommand shares."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (batch jobs, logs)")
