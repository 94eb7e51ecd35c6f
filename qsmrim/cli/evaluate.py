"""``qsmrim evaluate``: compare scorers with readers and consensus; write the report.

Reads tables only (no torch). Writes ``report.json``, ``report.md`` and ``report.html``
into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qsm_core.errors import InputError

__all__ = ["add_parser", "run"]


def add_parser(parser: argparse.ArgumentParser, name: str = "evaluate") -> None:
    """Fill the ``evaluate`` subcommand's parser."""
    parser.add_argument("--participants", required=True, type=Path, metavar="TSV",
                        help="participants.tsv (participant_id, diagnosis, age, sex, ...)")
    parser.add_argument("--lesions", required=True, type=Path, metavar="TSV",
                        help="lesions.tsv with reader_* calls, consensus, optional truth_prl")
    parser.add_argument("--predictions", nargs="+", default=[], type=Path, metavar="TSV",
                        help="one or more predictions.tsv (scorer columns NAME_prob or "
                             "NAME_score, and NAME_call)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder for report.json, report.md, report.html")
    parser.add_argument("--reference", default="consensus",
                        help="per-lesion reference column (consensus | truth_prl | any 0/1 "
                             "column; default: consensus)")
    parser.add_argument("--truth-column", default="truth_prl",
                        help="ground-truth column also reported against when present "
                             "(default: truth_prl; 'none' to skip)")
    parser.add_argument("--scorers", nargs="+", default=None, metavar="NAME",
                        help="evaluate only these scorers (default: all detected)")
    parser.add_argument("--group-column", default="diagnosis",
                        help="participants column defining groups (default: diagnosis)")
    parser.add_argument("--positive-group", default="MS",
                        help="group the per-patient rules should detect (default: MS)")
    parser.add_argument("--negative-group", default=None,
                        help="comparison group (default: all other participants)")
    parser.add_argument("--threshold", default="call",
                        help="how lesion calls are made: 'call' (the scorer's NAME_call "
                             "column, default), a number such as 0.5 (applied to NAME_prob), "
                             "'youden' or 'sensitivity=0.9' (chosen on out-of-fold patients)")
    parser.add_argument("--n-boot", type=int, default=2000,
                        help="patient-cluster bootstrap replicates (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap/fold seed (default 0)")
    parser.add_argument("--max-fpr", type=float, default=0.1,
                        help="upper FPR of the partial AUC (default: 0.1)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--no-figures", action="store_true", help="skip figures (faster)")
    parser.add_argument("--scored-only", action="store_true",
                        help="evaluate only the lesions the predictions score (e.g. after the "
                             "predictor's size filter); excluded lesions are listed in the report")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print where the report is."""
    from evaluation.harness import evaluate

    if args.n_boot < 1:
        raise InputError(f"--n-boot must be >= 1, got {args.n_boot}")
    out = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; give a folder path")
    truth = None if str(args.truth_column).lower() in ("none", "") else args.truth_column
    result = evaluate(args.participants, args.lesions, list(args.predictions),
                      truth_column=truth, reference=args.reference, scorers=args.scorers,
                      threshold=args.threshold, group_column=args.group_column,
                      positive_group=args.positive_group, negative_group=args.negative_group,
                      n_boot=args.n_boot, seed=args.seed, max_fpr=args.max_fpr,
                      out_dir=out, title=args.title, figures=not args.no_figures,
                      scored_only=args.scored_only)
    from evaluation.report import _summary_sentences

    for line in _summary_sentences(result):
        print(line)
    ne = result.get("not_estimable") or []
    if ne:
        print(f"{len(ne)} statistic(s) not estimable (listed in the report).", file=sys.stderr)
    print(f"report: {out / 'report.html'}")
    return 0
