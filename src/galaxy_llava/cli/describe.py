"""The commands that describe images: ``describe`` (captions on stdout), ``catalogue`` (a survey's
parquet morphology catalogue: resumable, shardable) and ``serve`` (the Gradio web app)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from galaxy_llava.cli.flags import (add_decoding, add_model, add_outside, add_overwrite,
                                    add_survey, decoding, survey)
from galaxy_llava.errors import EXIT_SKIPPED
from galaxy_llava.models.preflight import check_generation
from galaxy_llava.rules import RULE_SETS
from galaxy_llava.serve import serve
from galaxy_llava.survey_catalogue_folder import FAILURES


def add_describe(sub) -> None:
    """``galaxy-llava describe``."""
    s = sub.add_parser("describe", help="describe galaxy images")
    add_model(s)
    s.add_argument("paths", nargs="+", type=Path,
                   help="images, folders of images, or .csv/.parquet lists of paths (their "
                        "other columns, such as ra and dec, come through in --json)")
    add_decoding(s)
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
    add_survey(s)
    add_outside(s)
    s.set_defaults(func=_describe)


def _describe(args: argparse.Namespace) -> int | None:
    """One line per image (tab-separated, or JSONL with --json/--scores) as it is described;
    an unreadable file is one stderr line and the exit code says some were skipped."""
    check_generation(args.model, args.batch_size, args.num_beams, args.max_new_tokens)
    from galaxy_llava.generate import describe_paths

    skipped = 0
    for result in describe_paths(args.model, args.paths, **decoding(args), prompt=args.prompt,
                                 scores_rules=args.rules if args.scores else None,
                                 **survey(args), allow_outside=args.allow_outside_paths):
        if "error" in result:  # an unreadable file: one line on stderr, the others go on
            skipped += 1
            error = result["error"]  # most reasons already start with the file's name
            named = error if error.startswith(str(result["image"])) else \
                f"{result['image']}: {error}"
            print(f"galaxy-llava describe: skipped: {named}", file=sys.stderr)
        elif args.json or args.scores:
            print(json.dumps(result))
        else:
            print(f"{result['image']}\t{result['caption']}")
    return EXIT_SKIPPED if skipped else None


def add_catalogue(sub) -> None:
    """``galaxy-llava catalogue``."""
    s = sub.add_parser("catalogue", help="a parquet morphology catalogue of many images: "
                       "captions, attribute probabilities, entropy; resumable, shardable")
    add_model(s)
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
    add_decoding(s)
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
    add_overwrite(s)
    add_outside(s)
    add_survey(s)
    s.set_defaults(func=_catalogue)


def _catalogue(args: argparse.Namespace) -> int | None:
    """Build (or continue) the catalogue and say what this process did; the exit code is
    :data:`~galaxy_llava.errors.EXIT_SKIPPED` when it skipped inputs."""
    from galaxy_llava.survey_catalogue import build_catalogue

    s = build_catalogue(args.model, args.out, images=args.images, source=args.source,
                        rules=args.rules, **decoding(args), scores=not args.no_scores,
                        caption=args.caption, shard=args.shard, part_size=args.part_size,
                        overwrite=args.overwrite, allow_outside_paths=args.allow_outside_paths,
                        **survey(args))
    kept = (f"; continued an unfinished catalogue of other inputs or settings, keeping "
            f"{s['kept']} part(s) still valid" if s["kept"] is not None else "")
    print(f"catalogue {s['out']}: {s['items']} images in {s['parts']} part(s); this process "
          f"wrote {s['written']} and skipped {s['skipped']} already written{kept}; "
          f"{s['complete']}/{s['parts']} parts done")
    if s["failed"]:
        print(f"skipped {s['failed']} input(s) that could not be read (image, id, reason: "
              f"{Path(s['out']) / FAILURES}); exit code {EXIT_SKIPPED}")
        return EXIT_SKIPPED
    return None


def add_serve(sub) -> None:
    """``galaxy-llava serve``."""
    s = sub.add_parser("serve", help="a web app (Gradio) to describe galaxies by hand: one "
                       "image with its attribute probabilities, or a batch as CSV")
    add_model(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; anything "
                        "else exposes the app, which has no authentication)")
    s.add_argument("--port", type=int, default=7860, help="port to listen on")
    s.add_argument("--examples", type=Path, default=None,
                   help="folder of example galaxies to offer (default: the run's training "
                        "data, when recorded and still there)")
    add_decoding(s, batch=False)
    s.add_argument("--rules", default="reference", choices=list(RULE_SETS),
                   help="the caption grammar whose probabilities are shown")
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    serve(args.model, host=args.host, port=args.port, examples=args.examples,
          rules=args.rules, **decoding(args))
