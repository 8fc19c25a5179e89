"""The toy commands: ``synth`` (GalSim galaxies in the GZ2 schema), ``tiny-model`` (small models
of each family with random weights) and ``demo`` (the whole pipeline on them). The only part of
the command line that reaches into :mod:`galaxy_llava.toy`; the product never does."""

from __future__ import annotations

import argparse
from pathlib import Path

from galaxy_llava import checks, outputs
from galaxy_llava.cli.flags import add_overwrite
from galaxy_llava.models.folders import read_marker
from galaxy_llava.toy.demo import run_demo
from galaxy_llava.toy.tiny import PRESETS, TINY_BUILDERS, build_tiny_model


def add_synth(sub) -> None:
    """``galaxy-llava synth``."""
    s = sub.add_parser("synth", help="render synthetic galaxies in the GZ2 catalogue schema")
    s.add_argument("--out", type=Path, required=True,
                   help="folder to write: data/*.parquet (the Hub's layout) and synth.json")
    s.add_argument("--n", type=int, default=300, help="galaxies to render")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same galaxies)")
    s.add_argument("--image-size", type=int, default=424,
                   help="image side in pixels (GZ2's SDSS cutouts: 424)")
    add_overwrite(s)
    s.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> None:
    from galaxy_llava.toy.synthetic import synthesize

    paths = synthesize(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                       overwrite=args.overwrite)
    print(f"wrote {args.n} synthetic galaxies in {len(paths)} parquet shard(s) under {args.out}")


def add_tiny_model(sub) -> None:
    """``galaxy-llava tiny-model``."""
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
    add_overwrite(s)
    s.set_defaults(func=_tiny_model)


def _tiny_model(args: argparse.Namespace) -> None:
    checks.seed("--seed", args.seed)
    checks.number("--pretrain-steps", args.pretrain_steps, 0, integer=True)
    identity = {"kind": "model", "preset": args.preset, "family": args.family,
                "seed": args.seed, "pretrain_steps": args.pretrain_steps}
    outputs.claim(args.out, "model", overwrite=args.overwrite, identity=identity)
    with outputs.staged_folder(args.out) as folder:  # nothing half-made, even if killed
        build_tiny_model(folder, preset=args.preset, seed=args.seed,
                         pretrain_steps=args.pretrain_steps, family=args.family)
    print(tiny_model_summary(args))


def tiny_model_summary(args: argparse.Namespace) -> str:
    """What ``tiny-model`` wrote, in one line: untrained, or pretrained with its loss."""
    what = f"a {args.preset} {args.family} model"
    if not args.pretrain_steps:
        return f"wrote {what} with random weights (untrained) to {args.out}"
    from galaxy_llava.toy.pretrain import LOSS_FILE

    loss = read_marker(args.out).get("pretrain_loss") or {}
    how = (f", loss {loss['start']:.3f} -> {loss['final']:.3f} (first step -> mean of the last "
           f"{loss['final_is_mean_of_last']}; every step in {args.out / LOSS_FILE})"
           if loss else "")
    return (f"wrote {what} to {args.out}: pretrained from random weights for "
            f"{args.pretrain_steps} steps on generic scenes{how}")


def add_demo(sub) -> None:
    """``galaxy-llava demo``."""
    s = sub.add_parser("demo", help="the whole pipeline offline on synthetic galaxies")
    s.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="folder for everything the demo makes")
    s.add_argument("--n", type=int, default=600, help="synthetic galaxies to render")
    s.add_argument("--family", default="llava", choices=list(TINY_BUILDERS),
                   help="the tiny model's family")
    s.add_argument("--seed", type=int, default=0, help="seed of every step")
    s.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    run_demo(args.out, n_galaxies=args.n, seed=args.seed, family=args.family)
