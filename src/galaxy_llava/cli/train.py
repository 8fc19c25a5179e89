"""``galaxy-llava train`` (fine-tuning on the Hugging Face Trainer; its flags are
TrainingArguments', parsed by :mod:`galaxy_llava.training.arguments`) and ``export`` (a run as a
plain checkpoint of its model family)."""

from __future__ import annotations

import argparse
from pathlib import Path

from galaxy_llava import outputs
from galaxy_llava.cli.flags import add_overwrite
from galaxy_llava.models.folders import run_kind, write_marker
from galaxy_llava.models.preflight import preflight_model
from galaxy_llava.models.registry import family_for
from galaxy_llava.saving import export_run
from galaxy_llava.training.arguments import parse_cli, precheck, print_help, wants_help


def add_train(sub) -> None:
    """``galaxy-llava train``, listed for the command's ``--help``: its flags are parsed by
    :func:`run_train`, with TrainingArguments' own parser."""
    sub.add_parser("train", add_help=False,
                   help="fine-tune (full, LoRA or QLoRA) with the Hugging Face Trainer; "
                        "`galaxy-llava train --help` lists every TrainingArguments flag")


def run_train(argv: list[str]) -> None:
    """``galaxy-llava train ARGV``: a cheap look at the flags first (an output folder that
    cannot be written, a checkpoint that is not there, a number out of range: no torch
    imported), then the full parse and the run."""
    if wants_help(argv):  # drawn without importing transformers once it has been seen
        print_help()
        return
    known = precheck(argv)
    from galaxy_llava.training.trainer import run_training

    run_training(*parse_cli(argv, known))


def add_export(sub) -> None:
    """``galaxy-llava export``."""
    s = sub.add_parser("export", help="a run as a plain checkpoint of its model family (LoRA "
                       "merged in): LLaVA, Qwen2-VL or Idefics3")
    s.add_argument("--run", type=Path, required=True,
                   help="RUN folder (galaxy-llava train's --output_dir) or one of its "
                        "checkpoint-N folders")
    s.add_argument("--out", type=Path, required=True, help="folder for the plain checkpoint")
    s.add_argument("--license", help="the model card's license (a Hub license id such as "
                   "apache-2.0); default: the base model card's, where it has one")
    add_overwrite(s)
    s.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    source = str(args.run.expanduser().resolve())
    preflight_model(args.run)
    outputs.claim(args.out, "model", overwrite=args.overwrite,
                  identity={"exported_from": source})
    with outputs.staged_folder(args.out) as folder:  # nothing half-made, even if killed
        export_run(args.run, folder, license=args.license)
        write_marker(folder, exported_from=source)
    print(export_summary(args.run, args.out))


def export_summary(run: Path, out: Path) -> str:
    """What ``export`` wrote, in one line naming the family and the architecture class that
    loads it (``Qwen2VLForConditionalGeneration``), and whether a LoRA adapter was merged."""
    from galaxy_llava.models.loading import load_config

    config = load_config(str(out))
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    merged = " with its LoRA adapter merged in" if run_kind(run) == "adapter" else ""
    return (f"wrote a plain {family_for(config).title} checkpoint ({architecture}){merged} "
            f"to {out}")
