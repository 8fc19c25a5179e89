"""The commands that measure: ``evaluate`` (describe a split and score the answers), ``probe``
(the linear-probe baseline on frozen vision features) and ``report`` (one HTML page of EVAL
folders)."""

from __future__ import annotations

import argparse
from pathlib import Path

from galaxy_llava.cli.flags import (add_dataset, add_decoding, add_model, add_outside,
                                    add_overwrite, decoding)
from galaxy_llava.evaluate import evaluate
from galaxy_llava.probe import probe
from galaxy_llava.report import build_report
from galaxy_llava.rules import RULE_SETS


def add_evaluate(sub) -> None:
    """``galaxy-llava evaluate``."""
    s = sub.add_parser("evaluate", help="describe a split and score the answers")
    add_model(s)
    add_dataset(s, split_help="the split described and scored")
    add_decoding(s)
    s.add_argument("--limit", type=int, default=None,
                   help="score only the first N galaxies (default: all)")
    s.add_argument("--no-scores", action="store_true",
                   help="beam search only: skip the grammar's scores (the most probable "
                        "caption, attribute probabilities and their calibration)")
    s.add_argument("--rules", default=None, choices=list(RULE_SETS),
                   help="the caption grammar scored (default: the one the dataset was "
                        "prepared with)")
    add_overwrite(s)
    add_outside(s)
    s.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    evaluate(args.model, args.data, split=args.split, out=args.out, **decoding(args),
             limit=args.limit, overwrite=args.overwrite,
             allow_outside_paths=args.allow_outside_paths, scores=not args.no_scores,
             rules=args.rules)
    _wrote_eval(args.out)


def _wrote_eval(out: Path) -> None:
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")


def add_probe(sub) -> None:
    """``galaxy-llava probe``."""
    s = sub.add_parser("probe", help="linear probe on frozen vision features (baseline)")
    add_model(s, help="run folder, model folder or Hub id (its vision encoder is used)")
    add_dataset(s, split_help="the split scored (the probe is fitted on train)")
    add_overwrite(s)
    add_outside(s)
    s.set_defaults(func=_probe)


def _probe(args: argparse.Namespace) -> None:
    probe(args.model, args.data, split=args.split, out=args.out, overwrite=args.overwrite,
          allow_outside_paths=args.allow_outside_paths)
    _wrote_eval(args.out)


def add_report(sub) -> None:
    """``galaxy-llava report``."""
    s = sub.add_parser("report", help="one self-contained HTML report of evaluations")
    s.add_argument("evals", nargs="+", type=Path,
                   help="EVAL folders, or folders holding EVAL folders (such as demo-out/eval)")
    s.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    add_overwrite(s)
    s.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> None:
    out = build_report(args.evals, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
