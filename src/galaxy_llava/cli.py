"""`galaxy-llava` command line: each subcommand parses its flags and calls one library function.

Heavy imports (torch, transformers, galsim) happen inside the handlers so `--help` is instant.
Errors a user can fix (:class:`galaxy_llava.errors.UserError`) print as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.rules import RULE_SETS
from galaxy_llava.toy.tiny import PRESETS


def _cmd_synth(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.synthetic import synthesize

    paths = synthesize(args.out, n=args.n, seed=args.seed, image_size=args.image_size)
    print(f"wrote {args.n} synthetic galaxies in {len(paths)} parquet shard(s) under {args.out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from galaxy_llava.prepare import prepare

    prepare(
        args.source, args.out, n_per_class=args.n_per_class, seed=args.seed,
        image_size=args.image_size, rules=args.rules, min_votes=args.min_votes,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        hub_config=args.hub_config, hub_split=args.hub_split, workers=args.workers,
    )


def _cmd_tiny_model(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.tiny import build_tiny_model

    out = build_tiny_model(args.out, preset=args.preset, seed=args.seed,
                           pretrain_steps=args.pretrain_steps)
    stage = f", pretrained {args.pretrain_steps} steps on generic scenes" if args.pretrain_steps else ""
    print(f"wrote a random-initialised {args.preset} LLaVA{stage} to {out}")


def _cmd_train(argv: list[str]) -> None:
    from galaxy_llava.training.trainer import train_cli

    train_cli(argv)


def _cmd_export(args: argparse.Namespace) -> None:
    from galaxy_llava.models.runs import export_run

    out = export_run(args.run, args.out)
    print(f"wrote a plain LLaVA checkpoint to {out}")


def _cmd_describe(args: argparse.Namespace) -> None:
    from galaxy_llava.generate import describe_paths

    for result in describe_paths(
        args.model, args.paths, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, prompt=args.prompt,
    ):
        print(json.dumps(result) if args.json else f"{result['image']}\t{result['text']}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from galaxy_llava.evaluate import evaluate_cli

    evaluate_cli(args)


def _cmd_probe(args: argparse.Namespace) -> None:
    from galaxy_llava.evaluate import probe_cli

    probe_cli(args)


def _cmd_report(args: argparse.Namespace) -> None:
    from galaxy_llava.report import build_report

    out = build_report(args.evals, args.out)
    print(f"wrote {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.demo import run_demo

    run_demo(args.out, n_galaxies=args.n, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="galaxy-llava", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="render synthetic galaxies in the GZ2 catalogue schema")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=424)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("prepare", help="build a balanced caption dataset (JSONL + images)")
    s.add_argument("--source", required=True,
                   help="Hub id (mwalmsley/gz2), parquet file/folder, save_to_disk folder or CSV")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n-per-class", type=int, default=1000)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--image-size", type=int, default=336)
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="caption rule set")
    s.add_argument("--min-votes", type=int, default=5, help="tree rules: votes a fraction needs")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--test-fraction", type=float, default=0.1)
    s.add_argument("--hub-config", default=None, help="Hub dataset config (default, tiny)")
    s.add_argument("--hub-split", default="train")
    s.add_argument("--workers", type=int, default=None, help="image workers (default: CPUs)")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("tiny-model", help="write a small random-initialised LLaVA (HF format)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--preset", default="tiny", choices=PRESETS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pretrain-steps", type=int, default=0,
                   help="first caption generic scenes for N steps so the model can see and speak")
    s.set_defaults(func=_cmd_tiny_model)

    # `train` has its own parser (HfArgumentParser over TrainingArguments); listed here for --help.
    sub.add_parser("train", add_help=False,
                   help="fine-tune (full, LoRA or QLoRA) with the Hugging Face Trainer; "
                        "`galaxy-llava train --help` lists every TrainingArguments flag")

    s = sub.add_parser("export", help="merge a LoRA run into a plain LLaVA checkpoint")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("describe", help="describe galaxy images")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("paths", nargs="+", type=Path, help="images or folders of images")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-beams", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--prompt", default=None, help="override the model's stored prompt")
    s.add_argument("--json", action="store_true", help="JSONL output")
    s.set_defaults(func=_cmd_describe)

    s = sub.add_parser("evaluate", help="describe a split and score the answers")
    s.add_argument("--model", required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-beams", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--limit", type=int, default=None, help="score only the first N galaxies")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("probe", help="linear probe on frozen vision features (baseline)")
    s.add_argument("--model", required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("report", help="one self-contained HTML report of evaluations")
    s.add_argument("evals", nargs="+", type=Path)
    s.add_argument("--out", type=Path, default=Path("report.html"))
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("demo", help="the whole pipeline offline on synthetic galaxies")
    s.add_argument("--out", type=Path, default=Path("demo-out"))
    s.add_argument("--n", type=int, default=600, help="synthetic galaxies to render")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `galaxy-llava` console script (and of ``python -m galaxy_llava``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its flags are TrainingArguments': parsed by its own parser
        command, run = "train", lambda: _cmd_train(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        run()
    except UserError as e:
        print(f"galaxy-llava {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"galaxy-llava {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
