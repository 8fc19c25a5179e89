"""`galaxy-llava` command line: each subcommand parses its flags and calls one library function.

Heavy imports (torch, transformers, galsim) happen inside the handlers so `--help` is instant.
Errors a user can fix (:class:`galaxy_llava.errors.UserError`, a full disk, a folder that cannot
be written) print as one line, exit code 2; anything unexpected prints one line too, exit code 1,
and ``galaxy-llava --debug COMMAND ...`` shows its traceback. Outputs follow the contract of
:mod:`galaxy_llava.outputs` (``--overwrite`` replaces another output of the same kind).
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.rules import RULE_SETS
from galaxy_llava.toy.tiny import FAMILIES, PRESETS


def _cmd_synth(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.synthetic import synthesize

    paths = synthesize(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                       overwrite=args.overwrite)
    print(f"wrote {args.n} synthetic galaxies in {len(paths)} parquet shard(s) under {args.out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from galaxy_llava.prepare import prepare

    prepare(
        args.source, args.out, n_per_class=args.n_per_class, seed=args.seed,
        image_size=args.image_size, rules=args.rules, min_votes=args.min_votes,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        hub_config=args.hub_config, hub_split=args.hub_split, workers=args.workers,
        overwrite=args.overwrite, allow_outside_paths=args.allow_outside_paths,
    )


def _cmd_tiny_model(args: argparse.Namespace) -> None:
    from galaxy_llava import checks, outputs

    checks.seed("--seed", args.seed)
    checks.number("--pretrain-steps", args.pretrain_steps, 0, integer=True)
    identity = {"kind": "model", "preset": args.preset, "family": args.family,
                "seed": args.seed, "pretrain_steps": args.pretrain_steps}
    outputs.claim(args.out, "model", overwrite=args.overwrite, identity=identity)
    from galaxy_llava.toy.tiny import build_tiny_model

    with outputs.staged_folder(args.out) as folder:  # nothing half-made, even if killed
        build_tiny_model(folder, preset=args.preset, seed=args.seed,
                         pretrain_steps=args.pretrain_steps, family=args.family)
    out = args.out
    stage = f", pretrained {args.pretrain_steps} steps on generic scenes" if args.pretrain_steps else ""
    print(f"wrote a random-initialised {args.preset} {args.family} model{stage} to {out}")


def _cmd_train(argv: list[str]) -> None:
    from galaxy_llava.training.arguments import precheck

    precheck(argv)  # a wrong --output_dir costs no torch import
    from galaxy_llava.training.trainer import train_cli

    train_cli(argv)


def _cmd_export(args: argparse.Namespace) -> None:
    from galaxy_llava import checks, outputs
    from galaxy_llava.models.folders import write_marker

    source = str(args.run.expanduser().resolve())
    checks.preflight_model(args.run)
    outputs.claim(args.out, "model", overwrite=args.overwrite,
                  identity={"exported_from": source})
    from galaxy_llava.models.runs import export_run

    with outputs.staged_folder(args.out) as folder:  # nothing half-made, even if killed
        export_run(args.run, folder)
        write_marker(folder, exported_from=source)
    out = args.out
    print(f"wrote a plain LLaVA checkpoint to {out}")


def _cmd_describe(args: argparse.Namespace) -> None:
    from galaxy_llava.checks import check_generation

    check_generation(args.model, args.batch_size, args.num_beams, args.max_new_tokens)
    from galaxy_llava.generate import describe_paths

    for result in describe_paths(
        args.model, args.paths, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, prompt=args.prompt,
        scores_rules=args.rules if args.scores else None,
    ):
        if args.json or args.scores:
            print(json.dumps(result))
        else:
            print(f"{result['image']}\t{result['text']}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from galaxy_llava.evaluate import evaluate_cli

    evaluate_cli(args)


def _cmd_probe(args: argparse.Namespace) -> None:
    from galaxy_llava.evaluate import probe_cli

    probe_cli(args)


def _cmd_catalogue(args: argparse.Namespace) -> None:
    from galaxy_llava.catalogue import catalogue_cli

    catalogue_cli(args)


def _cmd_report(args: argparse.Namespace) -> None:
    from galaxy_llava.report import build_report

    out = build_report(args.evals, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.demo import run_demo

    run_demo(args.out, n_galaxies=args.n, seed=args.seed, family=args.family)


def _overwrite(s: argparse.ArgumentParser) -> None:
    s.add_argument("--overwrite", action="store_true",
                   help="replace an output of the same kind made from other inputs (never a "
                        "folder by a file, nor one kind of output by another)")


def _outside(s: argparse.ArgumentParser) -> None:
    s.add_argument("--allow-outside-paths", action="store_true",
                   help="read images outside the dataset's or catalogue's own folder (a CSV "
                        "whose file_loc paths are absolute needs it)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="galaxy-llava", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an unexpected error (before the command: "
                        "galaxy-llava --debug train ...)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="render synthetic galaxies in the GZ2 catalogue schema")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=424)
    _overwrite(s)
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
    s.add_argument("--hub-config", default=None,
                   help="dataset config (default, tiny); in a local copy of a dataset "
                        "repository, its folder (default: data/) or its README's configs")
    s.add_argument("--hub-split", default="train")
    s.add_argument("--workers", type=int, default=None, help="image workers (default: CPUs)")
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("tiny-model", help="write a small random-initialised LLaVA (HF format)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--preset", default="tiny", choices=PRESETS)
    s.add_argument("--family", default="llava", choices=FAMILIES,
                   help="model family (qwen2_vl and idefics3: tiny preset only)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pretrain-steps", type=int, default=0,
                   help="first caption generic scenes for N steps so the model can see and speak")
    _overwrite(s)
    s.set_defaults(func=_cmd_tiny_model)

    # `train` has its own parser (HfArgumentParser over TrainingArguments); listed here for --help.
    sub.add_parser("train", add_help=False,
                   help="fine-tune (full, LoRA or QLoRA) with the Hugging Face Trainer; "
                        "`galaxy-llava train --help` lists every TrainingArguments flag")

    s = sub.add_parser("export", help="merge a LoRA run into a plain LLaVA checkpoint")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    _overwrite(s)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("describe", help="describe galaxy images")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("paths", nargs="+", type=Path, help="images or folders of images")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-beams", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--prompt", default=None, help="override the model's stored prompt")
    s.add_argument("--json", action="store_true", help="JSONL output")
    s.add_argument("--scores", action="store_true",
                   help="also score every caption of the grammar: the most probable caption, "
                        "each attribute's probabilities and the entropy (JSONL)")
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar scored with --scores")
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
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("probe", help="linear probe on frozen vision features (baseline)")
    s.add_argument("--model", required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--out", type=Path, required=True)
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("catalogue", help="a parquet morphology catalogue of many images: "
                       "captions, attribute probabilities, entropy; resumable, shardable")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("--out", type=Path, required=True, help="folder of part-XXXXX.parquet files")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="folders searched recursively for images (a "
                     "prepared dataset: its images/ only)")
    src.add_argument("--source", help="GZ2-schema catalogue: parquet file/folder, save_to_disk "
                     "folder, CSV with file_loc, or Hub id")
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar scored")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--num-beams", type=int, default=3)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--no-scores", action="store_true",
                   help="beam-search captions only (no grammar scores)")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="this job's share: parts i with i %% N == I (e.g. "
                        "--shard $SLURM_ARRAY_TASK_ID/N); combines with torchrun's RANK")
    s.add_argument("--part-size", type=int, default=256,
                   help="images per part file (the unit of resume and sharding)")
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_catalogue)

    s = sub.add_parser("report", help="one self-contained HTML report of evaluations")
    s.add_argument("evals", nargs="+", type=Path)
    s.add_argument("--out", type=Path, default=Path("report.html"))
    _overwrite(s)
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("demo", help="the whole pipeline offline on synthetic galaxies")
    s.add_argument("--out", type=Path, default=Path("demo-out"))
    s.add_argument("--n", type=int, default=600, help="synthetic galaxies to render")
    s.add_argument("--family", default="llava", choices=FAMILIES, help="the tiny model's family")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    for name, s in sub.choices.items():  # --debug after the command too (train: before it)
        if name != "train":
            s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the traceback of an unexpected error")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `galaxy-llava` console script (and of ``python -m galaxy_llava``).

    Exit codes: 0 done, 2 a problem the user can fix (one line), 1 an unexpected error (one line;
    ``--debug`` before the command re-raises it with its traceback), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = False
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    out = None
    if argv[:1] == ["train"]:  # its flags are TrainingArguments': parsed by its own parser
        command, run = "train", lambda: _cmd_train(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        debug, out = debug or args.debug, getattr(args, "out", None)
        command, run = args.command, lambda: args.func(args)
    try:
        run()
    except KeyboardInterrupt:
        print(f"galaxy-llava {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except Exception as e:
        if debug:
            raise
        code, message = _one_line(e, out)
        print(f"galaxy-llava {command}: {message}", file=sys.stderr)
        return code
    return 0


# OS errors a user can fix: space, permissions, a read-only disk, a file size limit.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def _one_line(e: Exception, out: Path | None = None) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended a command (``out``: its
    output, named when the disk fills up)."""
    text = " ".join(str(e).split())
    if isinstance(e, UserError):
        return 2, f"error: {text}"
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            target = f" {out}" if out is not None else where
            return 2, (f"error: no room to write{target}: {e.strerror} (a full disk or a file "
                       "size limit); free space and run again: the output was left as it was")
        return 2, f"error: {e.strerror or text}{where}"
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return 1, (f"internal error: {type(e).__name__}{': ' + first if first else ''}; run with "
               "--debug for the traceback (galaxy-llava --debug COMMAND ...)")


if __name__ == "__main__":
    sys.exit(main())
