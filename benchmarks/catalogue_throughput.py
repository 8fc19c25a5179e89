"""Catalogue throughput: images/s of ``galaxy-llava catalogue``'s two stages on a
random-initialised model, side by side in one run.

* ``beam``: beam-search captions only (``--no-scores``): ``describe_images``, beams 3, batched;
* ``scores``: the grammar posterior only (every caption of the ``reference`` rule set),
  ``grammar_scores`` with the prefix (prompt + image) run once per image, images batched;
* ``scores_per_image``: the same posterior, one image per forward (the batch size 1 baseline);
* ``scores_uncached``: the same posterior from one plain forward over prefix + candidate per
  candidate row (no shared cache: what scoring costs without :mod:`galaxy_llava.scoring`'s
  design);
* ``catalogue``: beam + scores, what a default catalogue row costs (derived from the two timings:
  ``1 / (1/beam + 1/scores)``).

Each recipe is warmed up first (not timed). ``--repeats`` alternates them and reports medians.
With ``--compare`` it ends with ``speedup: X.XXx`` (batched cached scoring over uncached).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def _timed(fn, device: str) -> float:
    bc.sync(device)
    t0 = time.perf_counter()
    fn()
    bc.sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(ap)
    ap.add_argument("--score-batch", type=int, default=8,
                    help="images per scoring forward in 'scores' (scores_per_image: 1)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="describe's default")
    ap.add_argument("--rules", default="reference")
    ap.add_argument("--compare", action="store_true",
                    help="also time per-image and uncached scoring and print the ratio")
    args = ap.parse_args(argv)

    import torch

    from galaxy_llava.config import DEFAULT_PROMPT
    from galaxy_llava.generate import describe_images
    from galaxy_llava.models.loading import resolve_dtype
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_image
    from galaxy_llava.rules import rule_set
    from galaxy_llava.scoring import grammar_scores
    from galaxy_llava.toy.tiny import build_model_in_memory

    device = bc.pick_device(args.device)
    torch.manual_seed(args.seed)
    paths, size = bc.image_paths(args.preset, args.n, args.seed)
    images = [load_image(p) for p in paths][:args.n]
    dtype = resolve_dtype(None, torch.device(device))
    model, processor = build_model_in_memory(args.preset, seed=args.seed, device=device,
                                             dtype=dtype)
    model.eval()
    threads = bc.set_threads(args.threads, device)
    family = family_for(model)
    n_candidates = len(rule_set(args.rules).reachable())

    def beam():
        describe_images(model, processor, images, DEFAULT_PROMPT, batch_size=args.batch_size,
                        num_beams=3, max_new_tokens=args.max_new_tokens, progress=False)

    def scores(batch: int):
        return lambda: grammar_scores(model, processor, images, args.rules, DEFAULT_PROMPT,
                                      batch_size=batch)

    def uncached():
        cls = type(family)
        saved = cls.prefix_cache_scoring
        cls.prefix_cache_scoring = False  # the plain-forward path every family has
        try:
            grammar_scores(model, processor, images, args.rules, DEFAULT_PROMPT, batch_size=1)
        finally:
            cls.prefix_cache_scoring = saved

    recipes = {"beam": beam, "scores": scores(args.score_batch)}
    if args.compare:
        recipes |= {"scores_per_image": scores(1), "scores_uncached": uncached}
    head = images[:2]
    with torch.no_grad():  # warm-up on two images: kernels, allocator
        describe_images(model, processor, head, DEFAULT_PROMPT, batch_size=2, num_beams=3,
                        max_new_tokens=args.max_new_tokens, progress=False)
        grammar_scores(model, processor, head, args.rules, DEFAULT_PROMPT, batch_size=2)
    runs: dict[str, list[float]] = {k: [] for k in recipes}
    peak = {}
    for _ in range(max(1, args.repeats)):
        for name, fn in recipes.items():
            with bc.PeakMemory(device) as mem:
                runs[name].append(len(images) / _timed(fn, device))
            peak[name] = max(peak.get(name, 0), mem.peak)
    m = bc.machine()
    print(bc.machine_line(m))
    print(f"preset {args.preset}, {len(images)} images of {size} px, device {device}, dtype "
          f"{str(dtype).replace('torch.', '')}, {n_candidates} candidate captions "
          f"({args.rules}), beam batch {args.batch_size}, score batch {args.score_batch}, "
          f"{threads} CPU thread(s)")
    summary: dict = {}
    for name, rs in runs.items():
        ips = bc.median(rs)
        summary[name] = {"images_per_s": ips, "runs": rs, "peak_memory": peak[name]}
        print(f"{name:17s} {ips:9.2f} images/s  (runs: {', '.join(f'{r:.2f}' for r in rs)}; "
              f"peak {bc.fmt_bytes(peak[name])})")
    both = 1 / (1 / summary["beam"]["images_per_s"] + 1 / summary["scores"]["images_per_s"])
    summary["catalogue"] = {"images_per_s": both}
    print(f"{'catalogue':17s} {both:9.2f} images/s  (beam + scores, per row)")
    ratio = None
    if args.compare:
        ratios = [a / b for a, b in zip(runs["scores"], runs["scores_uncached"])]
        ratio = bc.median(ratios)
        print(f"batched cached scoring / uncached: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {ratio:.2f})")
        per_image = bc.median([a / b for a, b in zip(runs["scores"], runs["scores_per_image"])])
        print(f"batched / one image per forward: median {per_image:.2f}")
        summary["speedup"], summary["speedup_batching"] = ratio, per_image
    bc.write_results(args.json, m, args, summary)
    if ratio is not None:
        print(bc.speedup_line(ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
