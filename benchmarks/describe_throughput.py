"""Description throughput: the notebook's one-image-at-a-time ``test_model`` against
``galaxy_llava.generate.describe_images`` (batched, left-padded), on a random-initialised model.

* reference: ``test_model(model, processor, path)`` per image, verbatim (beams 3,
  repetition_penalty 1.2, no_repeat_ngram_size 2, min_length 10, max_new_tokens 30), fp32 model;
* fast: ``describe_images`` with ``--batch-size`` images per ``generate`` call, beams 3 (the
  headline, same search width as the notebook) and greedy, ``max_new_tokens`` 30 like the notebook,
  in the dtype the package loads for inference (bf16 on a GPU, fp32 on CPU).

Each recipe is warmed up on one batch first (not timed). ``--repeats`` alternates the recipes and
reports medians. With ``--compare`` it ends with ``speedup: X.XXx`` (batched beams 3 over the
notebook, images/s).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def run_reference(model, processor, paths: list[str], device: str, counter) -> dict:
    """The notebook's loop: ``test_model`` on each image path in turn."""
    import reference_recipe as rr

    rr.test_model(model, processor, paths[0])  # warm-up
    bc.sync(device)
    counter.reset()
    t0 = time.perf_counter()
    texts = [rr.test_model(model, processor, p) for p in paths]
    bc.sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": len(paths) / dt, "seconds": dt,
            "mean_new_tokens": counter.mean, "example": texts[0]}


def run_fast(model, processor, paths: list[str], device: str, num_beams: int,
             batch_size: int, max_new_tokens: int, counter) -> dict:
    """``describe_images`` over all paths, ``batch_size`` per generate call."""
    from galaxy_llava.generate import describe_images
    from galaxy_llava.config import DEFAULT_PROMPT

    kw = dict(prompt=DEFAULT_PROMPT, batch_size=batch_size, num_beams=num_beams,
              max_new_tokens=max_new_tokens, progress=False)
    describe_images(model, processor, paths[:batch_size], **kw)  # warm-up
    bc.sync(device)
    counter.reset()
    t0 = time.perf_counter()
    texts = describe_images(model, processor, paths, **kw)
    bc.sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": len(paths) / dt, "seconds": dt,
            "mean_new_tokens": counter.mean, "example": texts[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(ap)
    ap.add_argument("--max-new-tokens", type=int, default=30, help="the notebook's 30")
    ap.add_argument("--compare", action="store_true",
                    help="run the notebook's loop too and print the ratio")
    ap.add_argument("--recipe", default="fast", choices=["fast", "reference"],
                    help="without --compare: which one to run")
    args = ap.parse_args(argv)

    import torch

    from galaxy_llava.models.loading import resolve_dtype
    from galaxy_llava.toy.tiny import build_model_in_memory

    device = bc.pick_device(args.device)
    torch.manual_seed(args.seed)
    paths, size = bc.image_paths(args.preset, args.n, args.seed)
    # The notebook: fp32 weights and PyTorch's default true-fp32 matmuls.
    torch.set_float32_matmul_precision("highest")
    model, processor = build_model_in_memory(args.preset, seed=args.seed, device=device,
                                             dtype=torch.float32)
    fast_dtype = resolve_dtype(None, torch.device(device))
    # Same weights for both; the fast copy in the dtype the package loads for inference.
    fast_model = model if fast_dtype == torch.float32 else copy.deepcopy(model).to(fast_dtype)
    threads = bc.set_threads(args.threads, device)
    pad = processor.tokenizer.pad_token_id
    ref_counter = bc.GenerateCounter(model, pad)
    fast_counter = ref_counter if fast_model is model else bc.GenerateCounter(fast_model, pad)
    want_ref = args.compare or args.recipe == "reference"
    want_fast = args.compare or args.recipe == "fast"
    runs: dict[str, list[dict]] = {"reference": [], "fast_beams3": [], "fast_greedy": []}
    for _ in range(max(1, args.repeats)):
        if want_ref:
            runs["reference"].append(run_reference(model, processor, paths, device, ref_counter))
        if want_fast:
            runs["fast_beams3"].append(run_fast(fast_model, processor, paths, device, 3,
                                                args.batch_size, args.max_new_tokens, fast_counter))
            runs["fast_greedy"].append(run_fast(fast_model, processor, paths, device, 1,
                                                args.batch_size, args.max_new_tokens, fast_counter))
    m = bc.machine()
    print(bc.machine_line(m))
    print(f"preset {args.preset}, {args.n} images of {size} px, device {device}, "
          f"fast dtype {str(fast_dtype).replace('torch.', '')}, batch {args.batch_size}, "
          f"{threads} CPU thread(s)")
    summary = {}
    for name, rs in runs.items():
        if not rs:
            continue
        ips = bc.median([r["images_per_s"] for r in rs])
        summary[name] = {"images_per_s": ips, "runs": [r["images_per_s"] for r in rs],
                         "mean_new_tokens": rs[-1]["mean_new_tokens"]}
        each = ", ".join(f"{r['images_per_s']:.2f}" for r in rs)
        print(f"{name:12s} {ips:8.2f} images/s  (runs: {each}; "
              f"~{rs[-1]['mean_new_tokens']:.0f} new tokens/image)")
    ratio = None
    if args.compare:
        ratios = [f["images_per_s"] / r["images_per_s"]
                  for f, r in zip(runs["fast_beams3"], runs["reference"])]
        greedy = [f["images_per_s"] / r["images_per_s"]
                  for f, r in zip(runs["fast_greedy"], runs["reference"])]
        ratio = bc.median(ratios)
        print(f"batched beams 3 / notebook: {', '.join(f'{x:.2f}' for x in ratios)} (median {ratio:.2f})")
        print(f"batched greedy  / notebook: {', '.join(f'{x:.2f}' for x in greedy)} "
              f"(median {bc.median(greedy):.2f})")
        summary["speedup_beams3"], summary["speedup_greedy"] = ratio, bc.median(greedy)
    bc.write_results(args.json, m, args, summary)
    if ratio is not None:
        print(bc.speedup_line(ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
