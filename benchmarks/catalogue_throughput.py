"""Catalogue throughput: images/s of what ``galaxy-llava catalogue`` does per batch, for each
preset, on a random-initialised model, side by side in one run.

* ``beam``: beam-search captions only (``describe_images``, beams 3, batched);
* ``flat``: the grammar's scores as they were before tree scoring (kept here as the baseline):
  the prompt and image run once, then every candidate caption is a row continuing its own copy
  of that cache (1 image per forward on a CPU, 2 on a GPU: the former defaults);
* ``tree``: the grammar's scores as the product computes them (``grammar_scores``: the
  candidates as one token tree after the cache, its default images per forward);
* ``catalogue_grammar``, ``catalogue_beam``, ``catalogue_both``: the catalogue's own per-batch
  step (``catalogue.caption_batch``) in each ``--caption`` mode, in batches of ``--batch-size``
  (parquet writing and model loading excluded).

Each recipe is warmed up first (not timed); ``--repeats`` alternates them and reports medians of
wall-clock images/s and of images per CPU-second (the process's CPU time: on a shared CPU the
wall clock also counts other jobs' time), and the peak memory (CUDA max allocated, or the
process's peak resident set on a CPU, model included). It ends with ``speedup: X.XXx``, tree
over flat scoring (the smaller over the presets run). ``--profile`` instead runs torch.profiler
over tree scoring once per preset and prints where its CPU time goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

RECIPES = ("beam", "flat", "tree", "catalogue_grammar", "catalogue_beam", "catalogue_both")


def flat_log_probs(model, processor, images, captions, prompt) -> list[list[float]]:
    """The former scorer: one forward over the images' prompts (one length), then
    ``images x candidates`` right-padded rows, each continuing a copy of its image's cache."""
    import torch

    from galaxy_llava.models.encoding import PromptIds
    from galaxy_llava.models.registry import family_for

    family, tok = family_for(model), processor.tokenizer
    param = next(model.parameters())
    per_image = [family.image_inputs(processor, im) for im in images]
    prefix = torch.tensor([PromptIds(processor, family, prompt)(x) for x in per_image],
                          device=param.device)
    seqs = [family.answer_ids(tok, c) + family.end_ids(tok) for c in captions]
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    inputs = {k: torch.cat([x[k] for x in per_image]).to(param.device) for k in per_image[0]}
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    with torch.no_grad():
        out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                    **inputs)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        n_images, n_cand = len(images), len(ids)
        cache.batch_repeat_interleave(n_cand)
        ids, mask = ids.to(param.device).repeat(n_images, 1), mask.to(param.device).repeat(
            n_images, 1)
        full = torch.cat([torch.ones((len(ids), prefix.shape[1]), dtype=torch.long,
                                     device=param.device), mask], dim=1)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=full, cache=cache,
                                       use_cache=False).logits.float(), dim=-1)
        scores = first.repeat_interleave(n_cand, dim=0).gather(1, ids[:, :1]).squeeze(1)
        follow = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (scores + (follow * mask[:, 1:]).sum(dim=1)).view(n_images, n_cand).tolist()


# torch.profiler op names -> the share of tree scoring's time they stand for.
_KINDS = (("attention", ("scaled_dot_product", "attention")),
          ("matrix products (projections, MLP, lm_head)", ("aten::mm", "aten::addmm", "aten::bmm")),
          ("log-sum-exp and reductions", ("aten::logsumexp", "aten::exp", "aten::amax",
                                          "aten::sub", "aten::sum", "aten::log")))


def profile_tree(fn) -> dict:
    """Shares of self CPU time of ``fn()`` by kind of op (the rest: norms, rotary, copies,
    masks, the vision tower)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    shares: dict[str, float] = {}
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    for e in events:
        kind = next((k for k, names in _KINDS if any(e.key.startswith(n) or n in e.key
                                                      for n in names)), "other")
        shares[kind] = shares.get(kind, 0.0) + e.self_cpu_time_total / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def _timed(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    bc.sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    bc.sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_preset(preset: str, args, device: str) -> dict:
    """Every recipe on one preset's model; the numbers per recipe."""
    import torch

    from galaxy_llava.survey_catalogue import caption_batch
    from galaxy_llava.config import DEFAULT_PROMPT
    from galaxy_llava.generate import describe_images
    from galaxy_llava.models.loading import resolve_dtype
    from galaxy_llava.records import load_image
    from galaxy_llava.rules import rule_set
    from galaxy_llava.scoring import grammar_scores
    from galaxy_llava.toy.tiny import build_model_in_memory

    torch.manual_seed(args.seed)
    paths, size = bc.image_paths(preset, args.n, args.seed)
    images = [load_image(p) for p in paths][:args.n]
    dtype = resolve_dtype(None, torch.device(device))
    model, processor = build_model_in_memory(preset, seed=args.seed, device=device, dtype=dtype)
    model.eval()
    captions = [m.caption() for m in rule_set(args.rules).reachable()]
    flat_batch = args.flat_batch or (2 if device.startswith("cuda") else 1)
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    def catalogue(mode):
        return lambda: [caption_batch(model, processor, b, DEFAULT_PROMPT, mode, args.rules,
                                      args.batch_size, 3, args.max_new_tokens) for b in batches]

    recipes = {
        "beam": lambda: describe_images(model, processor, images, DEFAULT_PROMPT,
                                        batch_size=args.batch_size, num_beams=3,
                                        max_new_tokens=args.max_new_tokens, progress=False),
        "flat": lambda: [flat_log_probs(model, processor, images[i:i + flat_batch], captions,
                                        DEFAULT_PROMPT)
                         for i in range(0, len(images), flat_batch)],
        "tree": lambda: grammar_scores(model, processor, images, args.rules, DEFAULT_PROMPT,
                                       batch_size=args.score_batch),
        **{f"catalogue_{m}": catalogue(m) for m in ("grammar", "beam", "both")}}
    head = images[:2]
    if args.profile:
        recipes["tree"]()  # warm-up
        shares = profile_tree(recipes["tree"])
        print(f"profile {preset}: tree scoring of {len(images)} images, self CPU time: "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
        return {"profile_tree": shares}
    with torch.no_grad():  # warm-up on two images: kernels, allocator
        describe_images(model, processor, head, DEFAULT_PROMPT, batch_size=2, num_beams=3,
                        max_new_tokens=args.max_new_tokens, progress=False)
        grammar_scores(model, processor, head, args.rules, DEFAULT_PROMPT)
        flat_log_probs(model, processor, head[:1], captions, DEFAULT_PROMPT)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in recipes}
    peak: dict[str, int] = {}
    for _ in range(max(1, args.repeats)):
        for name, fn in recipes.items():
            with bc.PeakMemory(device) as mem:
                runs[name].append(_timed(fn, device))
            peak[name] = max(peak.get(name, 0), mem.peak)
    print(f"preset {preset}, {len(images)} images of {size} px, device {device}, dtype "
          f"{str(dtype).replace('torch.', '')}, {len(captions)} candidate captions "
          f"({args.rules}), batch {args.batch_size}, flat scoring {flat_batch} image(s) per "
          f"forward, {torch.get_num_threads()} CPU thread(s)")
    out = {}
    for name, rs in runs.items():
        wall = [len(images) / w for w, _ in rs]
        cpu = [len(images) / c if c > 0 else float("nan") for _, c in rs]
        out[name] = {"images_per_s": bc.median(wall), "images_per_cpu_s": bc.median(cpu),
                     "runs": wall, "runs_cpu": cpu, "peak_memory": peak[name]}
        print(f"  {name:18s} {bc.median(wall):8.2f} images/s  {bc.median(cpu):8.2f} per CPU-s  "
              f"peak {bc.fmt_bytes(peak[name])}  (runs: {', '.join(f'{r:.2f}' for r in wall)})")
    tree_flat = bc.median([f / t for (t, _), (f, _) in zip(runs["tree"], runs["flat"])])
    grammar_beam = bc.median([b / g for (g, _), (b, _) in zip(runs["catalogue_grammar"],
                                                               runs["beam"])])
    out["tree_over_flat"], out["grammar_over_beam"] = tree_flat, grammar_beam
    print(f"  tree / flat scoring: {tree_flat:.2f}x; catalogue --caption grammar / beam only: "
          f"{grammar_beam:.2f}x (medians of per-repeat ratios, wall clock)")
    del model
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_common_args(ap, n=16)
    ap.add_argument("--presets", nargs="+", default=None,
                    help="presets run one after another in this process (default: --preset)")
    ap.add_argument("--flat-batch", type=int, default=None,
                    help="images per flat-scoring forward (default 1 on CPU, 2 on GPU)")
    ap.add_argument("--score-batch", type=int, default=None,
                    help="images per tree-scoring forward in 'tree' (default: grammar_scores')")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="describe's default")
    ap.add_argument("--profile", action="store_true",
                    help="only profile tree scoring (no timings, no speedup line)")
    ap.add_argument("--rules", default="reference")
    args = ap.parse_args(argv)
    device = bc.pick_device(args.device)
    bc.set_threads(args.threads, device)
    m = bc.machine()
    print(bc.machine_line(m))
    presets = args.presets or [args.preset]
    summary = {"presets": {p: run_preset(p, args, device) for p in presets}}
    if not args.profile:
        summary["speedup"] = min(r["tree_over_flat"] for r in summary["presets"].values())
    bc.write_results(args.json, m, args, summary)
    if not args.profile:
        print(bc.speedup_line(summary["speedup"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
