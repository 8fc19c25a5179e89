"""`galaxy-llava` command line: each subcommand parses its flags and calls one library function.

Heavy imports (torch, transformers, galsim) happen inside the handlers so `--help` is instant.
Errors a user can fix (:class:`galaxy_llava.errors.UserError`, a full disk, a folder that cannot
be written) print as one line, exit code 2; anything unexpected prints one line too, exit code 1,
and ``galaxy-llava --debug COMMAND ...`` shows its traceback. Outputs follow the contract of
:mod:`galaxy_llava.outputs` (``--overwrite`` replaces another output of the same kind).

Global flags (``--debug``, ``--verbose``, ``--threads N``) work before or after the command
(``train`` included: TrainingArguments' own ``debug`` is its ``--config`` YAML's ``debug:``
key); they set up the process (torch's CPU threads, transformers' progress bars and logging)
before any command imports torch or transformers. Every command takes both spellings of a flag
and shows the defaults in ``--help`` (:mod:`galaxy_llava.flags`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from galaxy_llava import __version__
from galaxy_llava.config import DEFAULT_THREADS, GLOBAL_FLAGS
from galaxy_llava.errors import UserError
from galaxy_llava.flags import ArgumentParser
from galaxy_llava.rules import RULE_SETS
from galaxy_llava.toy.tiny import PRESETS, TINY_BUILDERS


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
        images_root=args.images_root,
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
    print(_tiny_model_summary(args))


def _tiny_model_summary(args: argparse.Namespace) -> str:
    """What ``tiny-model`` wrote, in one line: untrained, or pretrained with its loss."""
    what = f"a {args.preset} {args.family} model"
    if not args.pretrain_steps:
        return f"wrote {what} with random weights (untrained) to {args.out}"
    from galaxy_llava.models.folders import read_marker
    from galaxy_llava.toy.pretrain import LOSS_FILE

    loss = read_marker(args.out).get("pretrain_loss") or {}
    how = (f", loss {loss['start']:.3f} -> {loss['final']:.3f} (first step -> mean of the last "
           f"{loss['final_is_mean_of_last']}; every step in {args.out / LOSS_FILE})"
           if loss else "")
    return (f"wrote {what} to {args.out}: pretrained from random weights for "
            f"{args.pretrain_steps} steps on generic scenes{how}")


def _cmd_train(argv: list[str]) -> None:
    from galaxy_llava.training.arguments import precheck, print_help, wants_help

    if wants_help(argv):  # drawn without importing transformers once it has been seen
        print_help()
        return
    precheck(argv)  # a wrong --output_dir costs no torch import
    from galaxy_llava.training.trainer import train_cli

    train_cli(argv)


def _cmd_export(args: argparse.Namespace) -> None:
    from galaxy_llava import outputs
    from galaxy_llava.models.folders import write_marker
    from galaxy_llava.models.preflight import preflight_model

    source = str(args.run.expanduser().resolve())
    preflight_model(args.run)
    outputs.claim(args.out, "model", overwrite=args.overwrite,
                  identity={"exported_from": source})
    from galaxy_llava.saving import export_run

    with outputs.staged_folder(args.out) as folder:  # nothing half-made, even if killed
        export_run(args.run, folder, license=args.license)
        write_marker(folder, exported_from=source)
    print(export_summary(args.run, args.out))


def export_summary(run: Path, out: Path) -> str:
    """What ``export`` wrote, in one line naming the family and the architecture class that
    loads it (``Qwen2VLForConditionalGeneration``), and whether a LoRA adapter was merged."""
    from galaxy_llava.models.folders import run_kind
    from galaxy_llava.models.loading import load_config
    from galaxy_llava.models.registry import family_for

    config = load_config(str(out))
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    merged = " with its LoRA adapter merged in" if run_kind(run) == "adapter" else ""
    return (f"wrote a plain {family_for(config).title} checkpoint ({architecture}){merged} "
            f"to {out}")


def _cmd_describe(args: argparse.Namespace) -> int | None:
    from galaxy_llava.errors import EXIT_SKIPPED
    from galaxy_llava.fitscutouts import options_from_args
    from galaxy_llava.models.preflight import check_generation

    check_generation(args.model, args.batch_size, args.num_beams, args.max_new_tokens)
    from galaxy_llava.generate import describe_paths

    skipped = 0
    for result in describe_paths(
        args.model, args.paths, batch_size=args.batch_size, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, prompt=args.prompt,
        scores_rules=args.rules if args.scores else None, fits=options_from_args(args),
        strict=args.strict, allow_outside=args.allow_outside_paths,
    ):
        if "error" in result:  # an unreadable file: one line on stderr, the others go on
            skipped += 1
            error = result["error"]  # most reasons already start with the file's name
            named = error if error.startswith(str(result["image"])) else \
                f"{result['image']}: {error}"
            print(f"galaxy-llava describe: skipped {named}", file=sys.stderr)
        elif args.json or args.scores:
            print(json.dumps(result))
        else:
            print(f"{result['image']}\t{result['caption']}")
    return EXIT_SKIPPED if skipped else None


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from galaxy_llava.evaluate import evaluate_cli

    evaluate_cli(args)


def _cmd_probe(args: argparse.Namespace) -> None:
    from galaxy_llava.probe import probe_cli

    probe_cli(args)


def _cmd_catalogue(args: argparse.Namespace) -> int | None:
    from galaxy_llava.catalogue import catalogue_cli

    return catalogue_cli(args)


def _cmd_report(args: argparse.Namespace) -> None:
    from galaxy_llava.report import build_report

    out = build_report(args.evals, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from galaxy_llava.serve import serve_cli

    serve_cli(args)


def _cmd_demo(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.demo import run_demo

    run_demo(args.out, n_galaxies=args.n, seed=args.seed, family=args.family)


def _overwrite(s: argparse.ArgumentParser) -> None:
    s.add_argument("--overwrite", action="store_true",
                   help="replace an output of the same kind made from other inputs (never a "
                        "folder by a file, nor one kind of output by another)")


def _survey(s: argparse.ArgumentParser) -> None:
    from galaxy_llava.errors import EXIT_SKIPPED
    from galaxy_llava.fitscutouts import add_flags

    s.add_argument("--strict", action="store_true",
                   help="stop at the first input that cannot be read (default: skip it, say "
                        f"so, and exit with code {EXIT_SKIPPED} at the end)")
    add_flags(s)


def _decoding(s: argparse.ArgumentParser, batch: bool = True) -> None:
    """The decoding flags of a command that describes images, with :data:`DECODING`'s
    defaults (``batch``: also ``--batch-size``)."""
    from galaxy_llava.config import DECODING

    if batch:
        s.add_argument("--batch-size", type=int, default=DECODING.batch_size,
                       help="images per batch")
    s.add_argument("--num-beams", type=int, default=DECODING.num_beams,
                   help="beam width (1: greedy)")
    s.add_argument("--max-new-tokens", type=int, default=DECODING.max_new_tokens,
                   help="longest answer, in tokens")


def _outside(s: argparse.ArgumentParser) -> None:
    s.add_argument("--allow-outside-paths", action="store_true",
                   help="read images outside the dataset's or catalogue's own folder (a CSV "
                        "whose file_loc paths are absolute needs it)")


DESCRIPTION = ("Teach vision-language models (LLaVA, Qwen2-VL, SmolVLM) to describe Galaxy Zoo 2 "
               "galaxies: build a caption dataset, fine-tune (full, LoRA or QLoRA), describe "
               "images, evaluate against the volunteers' votes, and catalogue whole surveys.")
EPILOG = ("Try `galaxy-llava demo` first: the whole pipeline offline on synthetic galaxies "
          "(minutes on a CPU). `galaxy-llava COMMAND --help` lists a command's flags.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``train``'s flags: its own parser)."""
    p = ArgumentParser(prog="galaxy-llava", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"galaxy-llava {__version__}",
                   help="print the version and exit")
    for flag, kwargs in GLOBAL_FLAGS.items():
        p.add_argument(flag, **kwargs)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="render synthetic galaxies in the GZ2 catalogue schema")
    s.add_argument("--out", type=Path, required=True,
                   help="folder to write: data/*.parquet (the Hub's layout) and synth.json")
    s.add_argument("--n", type=int, default=300, help="galaxies to render")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same galaxies)")
    s.add_argument("--image-size", type=int, default=424,
                   help="image side in pixels (GZ2's SDSS cutouts: 424)")
    _overwrite(s)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("prepare", help="build a balanced caption dataset (JSONL + images)")
    s.add_argument("--source", required=True,
                   help="Hub id (mwalmsley/gz2), parquet file/folder, save_to_disk folder or CSV")
    s.add_argument("--out", type=Path, required=True,
                   help="the dataset folder to write (captions, images, statistics)")
    s.add_argument("--n-per-class", type=int, default=1000,
                   help="galaxies per class (elliptical, spiral), at most")
    s.add_argument("--seed", type=int, default=42, help="seed of the selection and the splits")
    s.add_argument("--image-size", type=int, default=336,
                   help="side of the saved images in pixels (TinyLLaVA's CLIP: 336)")
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="caption rule set")
    s.add_argument("--min-votes", type=int, default=5, help="tree rules: votes a fraction needs")
    s.add_argument("--validation-fraction", "--val-fraction", dest="val_fraction", type=float,
                   default=0.1, metavar="F", help="share of the galaxies held out for validation")
    s.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of the galaxies held out for testing")
    s.add_argument("--hub-config", default=None,
                   help="dataset config (default, tiny); in a local copy of a dataset "
                        "repository, its folder (default: data/) or its README's configs")
    s.add_argument("--hub-split", default="train", help="split of the source dataset to read")
    s.add_argument("--workers", type=int, default=None, help="image workers (default: CPUs)")
    s.add_argument("--images-root", type=Path, default=None,
                   help="folder the catalogue's relative image paths are read from: file_loc, "
                        "or galaxy-datasets' subfolder + filename (default: the catalogue's "
                        "images/ folder for those, else its own folder)")
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("tiny-model", help="write a small model with random weights in the "
                       "Hugging Face layout, for tests and the demo (--pretrain-steps N: first "
                       "taught to caption generic scenes)")
    s.add_argument("--out", type=Path, required=True, help="model folder to write")
    s.add_argument("--preset", default="tiny", choices=PRESETS,
                   help="size: tiny (0.7 M parameters, 64 px), mini (TinyLLaVA's costly shapes "
                        "on 2 layers, 18.5 M), tinyllava (TinyLLaVA's shapes, 1.4 B)")
    s.add_argument("--family", default="llava", choices=list(TINY_BUILDERS),
                   help="model family (qwen2_vl and idefics3: tiny preset only)")
    s.add_argument("--seed", type=int, default=0, help="seed of the weights and the pretraining")
    s.add_argument("--pretrain-steps", type=int, default=0,
                   help="first caption generic scenes for N steps so the model can see and speak")
    _overwrite(s)
    s.set_defaults(func=_cmd_tiny_model)

    # `train` has its own parser (HfArgumentParser over TrainingArguments); listed here for --help.
    sub.add_parser("train", add_help=False,
                   help="fine-tune (full, LoRA or QLoRA) with the Hugging Face Trainer; "
                        "`galaxy-llava train --help` lists every TrainingArguments flag")

    s = sub.add_parser("export", help="a run as a plain checkpoint of its model family (LoRA "
                       "merged in): LLaVA, Qwen2-VL or Idefics3")
    s.add_argument("--run", type=Path, required=True,
                   help="RUN folder (galaxy-llava train's --output_dir) or one of its "
                        "checkpoint-N folders")
    s.add_argument("--out", type=Path, required=True, help="folder for the plain checkpoint")
    s.add_argument("--license", help="the model card's license (a Hub license id such as "
                   "apache-2.0); default: the base model card's, where it has one")
    _overwrite(s)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("describe", help="describe galaxy images")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("paths", nargs="+", type=Path,
                   help="images, folders of images, or .csv/.parquet lists of paths (their "
                        "other columns, such as ra and dec, come through in --json)")
    _decoding(s)
    s.add_argument("--prompt", default=None,
                   help="the prompt (default: the one stored with the model)")
    s.add_argument("--json", action="store_true",
                   help="JSONL output: image, caption (the names of catalogue's columns)")
    s.add_argument("--scores", action="store_true",
                   help="also score every caption of the grammar, as catalogue's columns: "
                        "best_caption, each attribute's value, p_<attribute>_<value> and "
                        "entropy (JSONL)")
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar scored with --scores")
    _survey(s)
    _outside(s)
    s.set_defaults(func=_cmd_describe)

    s = sub.add_parser("evaluate", help="describe a split and score the answers")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("--data", type=Path, required=True,
                   help="prepared dataset folder (galaxy-llava prepare)")
    s.add_argument("--split", default="test", help="the split described and scored")
    s.add_argument("--out", type=Path, required=True, help="EVAL folder to write")
    _decoding(s)
    s.add_argument("--limit", type=int, default=None,
                   help="score only the first N galaxies (default: all)")
    s.add_argument("--no-scores", action="store_true",
                   help="beam search only: skip the grammar's scores (the most probable "
                        "caption, attribute probabilities and their calibration)")
    s.add_argument("--rules", default=None, choices=list(RULE_SETS),
                   help="the caption grammar scored (default: the one the dataset was "
                        "prepared with)")
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("probe", help="linear probe on frozen vision features (baseline)")
    s.add_argument("--model", required=True,
                   help="run folder, model folder or Hub id (its vision encoder is used)")
    s.add_argument("--data", type=Path, required=True,
                   help="prepared dataset folder (galaxy-llava prepare)")
    s.add_argument("--split", default="test",
                   help="the split scored (the probe is fitted on train)")
    s.add_argument("--out", type=Path, required=True, help="EVAL folder to write")
    _overwrite(s)
    _outside(s)
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("catalogue", help="a parquet morphology catalogue of many images: "
                       "captions, attribute probabilities, entropy; resumable, shardable")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("--out", type=Path, required=True, help="folder of part-XXXXX.parquet files")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="folders searched recursively for .jpg/.png/"
                     ".tif/.fits(.gz) images (a prepared dataset: its images/ only), .csv/.parquet "
                     "lists of paths (column path, file_loc or image, or path_<band> per band; "
                     "optional id; other columns are kept), or images")
    src.add_argument("--source", help="GZ2-schema catalogue: parquet file/folder, save_to_disk "
                     "folder, CSV with file_loc, or Hub id")
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar scored")
    _decoding(s)
    s.add_argument("--no-scores", action="store_true",
                   help="beam-search captions only (no grammar scores): --caption beam")
    s.add_argument("--caption", choices=["grammar", "beam", "both"], default=None,
                   help="the row's caption: the grammar's most probable (default; no beam "
                        "search), beam search's (no scores), or beam search's beside the scores")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="this job's share: parts i with i %% N == I (e.g. "
                        "--shard $SLURM_ARRAY_TASK_ID/N); combines with torchrun's RANK "
                        "(default: every part)")
    s.add_argument("--part-size", type=int, default=256,
                   help="images per part file (the unit of resume and sharding)")
    _overwrite(s)
    _outside(s)
    _survey(s)
    s.set_defaults(func=_cmd_catalogue)

    s = sub.add_parser("report", help="one self-contained HTML report of evaluations")
    s.add_argument("evals", nargs="+", type=Path,
                   help="EVAL folders, or folders holding EVAL folders (such as demo-out/eval)")
    s.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    _overwrite(s)
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("serve", help="a web app (Gradio) to describe galaxies by hand: one "
                       "image with its attribute probabilities, or a batch as CSV")
    s.add_argument("--model", required=True, help="run folder, model folder or Hub id")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; anything "
                        "else exposes the app, which has no authentication)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on")
    s.add_argument("--examples", type=Path, default=None,
                   help="folder of example galaxies to offer (default: the run's training "
                        "data, when recorded and still there)")
    _decoding(s, batch=False)
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar whose probabilities are shown")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("demo", help="the whole pipeline offline on synthetic galaxies")
    s.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="folder for everything the demo makes")
    s.add_argument("--n", type=int, default=600, help="synthetic galaxies to render")
    s.add_argument("--family", default="llava", choices=list(TINY_BUILDERS),
                   help="the tiny model's family")
    s.add_argument("--seed", type=int, default=0, help="seed of every step")
    s.set_defaults(func=_cmd_demo)
    for name, s in sub.choices.items():  # main() takes them anywhere; listed in each --help
        if name != "train":
            for flag, kwargs in GLOBAL_FLAGS.items():
                s.add_argument(flag, **{**kwargs, "default": argparse.SUPPRESS})
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `galaxy-llava` console script (and of ``python -m galaxy_llava``).

    Exit codes: 0 done, 2 a problem the user can fix (one line), 1 an unexpected error (one line;
    ``--debug`` re-raises it with its traceback), 3 done but some inputs skipped as unreadable
    (``describe``, ``catalogue``), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options, argv = _global_options(argv)
    debug, out = options.debug, None
    quiet = True  # transformers' logging set up (an import: skipped by train's cached --help)
    if argv[:1] == ["train"]:  # its flags are TrainingArguments': parsed by its own parser
        from galaxy_llava.training.arguments import wants_help

        command, run = "train", lambda: _cmd_train(argv[1:])
        quiet = not wants_help(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        out = getattr(args, "out", None)
        command, run = args.command, lambda: args.func(args)
    try:
        use_threads(options.threads)
        if quiet:
            quiet_libraries(options.verbose)
        code = run()  # a handler may say it finished with inputs skipped
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
    return code if isinstance(code, int) else 0


def _global_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--debug``, ``--verbose`` and ``--threads N`` wherever they stand, and the rest of
    ``argv``: taken out here so that they work the same for ``train``, whose parser is not ours
    (``--debug`` is galaxy-llava's there too; TrainingArguments' own ``debug`` is set in the
    ``--config`` YAML)."""
    start = 0  # the command's position: after the global flags before it
    while start < len(argv) and argv[start].startswith("-"):
        start += 2 if argv[start] == "--threads" else 1

    def parse(args: list[str]):
        parser = argparse.ArgumentParser(prog="galaxy-llava", add_help=False, allow_abbrev=False)
        for flag, kwargs in GLOBAL_FLAGS.items():
            parser.add_argument(flag, **{**kwargs, "default": None})
        return parser.parse_known_args(args)

    before, head = parse(argv[:start])
    after, tail = parse(argv[start:])
    options = argparse.Namespace(**{
        key: value if value is not None else getattr(after, key, None)
        for key, value in vars(before).items()})
    options.debug, options.verbose = bool(options.debug), bool(options.verbose)
    return options, head + tail


def use_threads(threads: int | None) -> None:
    """Set torch's CPU threads: ``threads`` (``--threads``; 0 leaves torch's own choice), else
    an ``OMP_NUM_THREADS`` the user set, else :data:`~galaxy_llava.config.DEFAULT_THREADS`
    (measured: BENCHMARKS.md). Done through ``OMP_NUM_THREADS`` before torch is imported, so the
    thread pool starts at that size (torch takes at most one per core that way) and processes
    started from here inherit it; on torch itself too when it is already imported (``main``
    called from Python)."""
    from galaxy_llava.checks import number

    number("--threads", threads, 0, integer=True, optional=True)
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    threads = DEFAULT_THREADS if threads is None else threads
    if threads == 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def quiet_libraries(verbose: bool) -> None:
    """Without ``--verbose``, transformers logs errors only and draws none of its own progress
    bars (the "Loading weights" bar of every model load, "Writing model shards" of every save):
    noise around each command's output. galaxy-llava's own bars (pretraining, description, the
    Trainer's) are plain tqdm and stay, and so do the Hub's download bars (a multi-GB download
    deserves one). ``--verbose`` restores the library's defaults."""
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


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
