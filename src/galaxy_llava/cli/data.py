"""``galaxy-llava prepare``: a GZ2-schema catalogue (Hub id, parquet, ``save_to_disk`` folder or
CSV) into a balanced caption dataset (:func:`galaxy_llava.prepare.prepare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from galaxy_llava.cli.flags import add_outside, add_overwrite
from galaxy_llava.rules import RULE_SETS


def add_prepare(sub) -> None:
    """``galaxy-llava prepare``."""
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
    add_overwrite(s)
    add_outside(s)
    s.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> None:
    from galaxy_llava.prepare import prepare

    prepare(args.source, args.out, n_per_class=args.n_per_class, seed=args.seed,
            image_size=args.image_size, rules=args.rules, min_votes=args.min_votes,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            hub_config=args.hub_config, hub_split=args.hub_split, workers=args.workers,
            overwrite=args.overwrite, allow_outside_paths=args.allow_outside_paths,
            images_root=args.images_root)
