"""Entry point of the ``qsmrim`` console script.

Subcommand modules are imported lazily, so ``qsmrim evaluate`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from qsm_core import __version__
from qsm_core.errors import QSMRimError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "recon": ("qsmrim.cli.recon", "multi-echo GRE -> QSM (BIDS dataset or explicit files)"),
    "unwrap": ("qsmrim.cli.steps", "Laplacian phase unwrapping of one NIfTI"),
    "bgremove": ("qsmrim.cli.steps", "background field removal of a total field"),
    "invert": ("qsmrim.cli.steps", "dipole inversion of a local field"),
    "simulate": ("qsmrim.cli.simulate", "simulate an MS/NMOSD cohort as a BIDS dataset"),
    "lesions": ("qsmrim.cli.lesions", "label FLAIR lesions and write the lesion table"),
    "extract": ("qsmrim.cli.lesions", "extract per-lesion QSM/FLAIR patches to a cache"),
    "train": ("qsmrim.cli.train", "train the rim CNN with patient-grouped cross-validation"),
    "predict": ("qsmrim.cli.predict", "score every lesion of new scans"),
    "evaluate": ("qsmrim.cli.evaluate", "compare scorers with readers and consensus"),
    "demo": ("qsmrim.cli.demo", "simulate, reconstruct, train, predict and evaluate"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports every subcommand module)."""
    parser = argparse.ArgumentParser(
        prog="qsmrim", description="QSM reconstruction and paramagnetic rim lesion detection.")
    parser.add_argument("--version", action="version", version=f"qsmrim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_parser(p, name)
        p.set_defaults(_module=module)
    return parser


def _peek_command(argv: list[str]) -> str | None:
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _peek_command(argv)
    if name is None:
        parser = build_parser()
        parser.parse_args(argv or ["--help"])
        return 0
    # Build only the parser of the subcommand asked for (keeps start-up light).
    parser = argparse.ArgumentParser(prog="qsmrim")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")
    module, help_ = COMMANDS[name]
    mod = importlib.import_module(module)
    mod.add_parser(sub.add_parser(name, help=help_, description=help_), name)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(mod.run(args) or 0)
    except QSMRimError as exc:
        print(f"qsmrim {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qsmrim {name}: interrupted", file=sys.stderr)
        return 130
