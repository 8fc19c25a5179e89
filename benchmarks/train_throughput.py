"""Training throughput: the notebook's recipe (HF Trainer, fp32) against galaxy_llava's fast path.

* ``--recipe reference``: ``benchmarks/reference_recipe.py``: the notebook's ``GZ2LLaVADataset``
  (processor called twice per item, image included), its ``collate_fn`` (LoRA) or Trainer's default
  collator (full), its ``TrainingArguments`` (fp32, batch 1 full / 8 LoRA, lr 1e-5 / 5e-5), full
  logits at every position, a random-initialised model of the preset in fp32.
* ``--recipe fast``: ``galaxy_llava.train``'s own loop, ``step.run_steps`` over
  ``step.batch_source`` (the functions ``train._train`` runs): ``TrainData`` (tokenised once),
  ``build_feature_store`` (frozen tower run once per image, features kept in memory), the
  examples padded once into device tensors (``PackedData``: no DataLoader or collation per step),
  ``TrainStep`` (bf16 autocast on a GPU, loss only at label positions, fused AdamW, the lean
  decoder and LoRA forwards of ``features.py``), the same batch sizes, optimizer steps and a LoRA
  of the same rank (16, alpha 16, dropout 0.05) as the reference.

samples/s and tokens/s count real tokens (attention mask: prompt, image tokens and caption; not
padding) over the timed steps; peak memory is CUDA max-allocated on a GPU, else the process's peak
resident set sampled during the recipe (which includes the ~0.6 GiB of imported libraries).
Both train on the same synthetic galaxies (real GZ2-grammar captions, the preset's image size).
``--warmup`` optimizer steps run first and are not timed; the next ``--steps`` are. With
``--compare`` both recipes run in this process (``--repeats`` times, alternating which goes first)
and the last line is ``speedup: X.XXx`` (median of fast/reference samples/s).

FLOPs (for MFU on a GPU; counted as executed, per batch, from the model's shapes; P = matmul
parameters, T = tokens through them, embeddings are lookups and cost nothing):
  forward       2*P*T for every weight the tokens pass through, plus attention 4*layers*T^2*d
                (QK^T and AV, no causal discount); the vision tower (all layers, 577 tokens) only
                when features are not cached; lm_head at every position (reference) or only at
                label positions (fast);
  full backward 2x forward for trainable weights (activation + weight grads) and attention; the
                projector's input grad is not needed (its input is frozen): 1x;
  LoRA backward activation grads only for frozen weights (1x forward) and attention (2x), LoRA
                weights 2x their forward (2*numel*T each way); a frozen, un-adapted projector
                (the reference's ``mm_projector`` target matched nothing) needs no backward.
MFU = executed FLOP/s / the GPU's dense bf16 peak (H100 SXM and H200: 989e12), for both recipes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

# Notebook job: 3 epochs x 1,800 training samples; its measured times on a Colab GPU.
JOB_SAMPLES = 3 * 1800
JOB_IMAGES = 2000
NOTEBOOK_SECONDS = {"full": 2216.3, "lora": 1231.3}
REFERENCE_BATCH = {"full": 1, "lora": 8}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 16, 0.05  # the reference's effective LoRA (see reference_recipe)


# ---------------------------------------------------------------- FLOPs

def model_dims(model) -> dict:
    """Matmul parameter counts and shapes of a (possibly peft-wrapped) LLaVA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    v, t = cfg.vision_config, cfg.text_config
    kv = t.hidden_size * t.num_key_value_heads // t.num_attention_heads
    lora_lm = sum(p.numel() for n, p in model.named_parameters()
                  if "lora_" in n and "language_model" in n and p.requires_grad)
    lora_proj = sum(p.numel() for n, p in model.named_parameters()
                    if "lora_" in n and "multi_modal_projector" in n and p.requires_grad)
    return {
        "vision_tokens": (v.image_size // v.patch_size) ** 2 + 1,
        "vision_layers": v.num_hidden_layers, "vision_d": v.hidden_size,
        "P_vision": v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size),
        "P_proj": v.hidden_size * t.hidden_size + t.hidden_size ** 2,
        "lm_layers": t.num_hidden_layers, "lm_d": t.hidden_size,
        "P_lm": t.num_hidden_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv
                                       + 3 * t.hidden_size * t.intermediate_size),
        "P_head": t.hidden_size * t.vocab_size,
        "lora_lm": lora_lm, "lora_proj": lora_proj,
        "image_tokens": (v.image_size // v.patch_size) ** 2,
    }


def batch_flops(d: dict, method: str, batch: int, padded_len: int, head_positions: int,
                vision: bool, projector_lora: bool) -> float:
    """Executed FLOPs of one training step (see the module doc for the conventions)."""
    tok = batch * padded_len
    img = batch * d["image_tokens"]
    attn = 4 * d["lm_layers"] * batch * padded_len ** 2 * d["lm_d"]
    fwd_lm, fwd_head, fwd_proj = 2 * d["P_lm"] * tok, 2 * d["P_head"] * head_positions, 2 * d["P_proj"] * img
    total = fwd_lm + attn + fwd_head + fwd_proj
    if vision:
        vt = d["vision_tokens"]
        total += batch * (2 * d["P_vision"] * vt + 4 * d["vision_layers"] * vt ** 2 * d["vision_d"])
    if method == "full":
        total += 2 * fwd_lm + 2 * attn + 2 * fwd_head + fwd_proj
    else:
        lora = 2 * d["lora_lm"] * tok + (2 * d["lora_proj"] * img if projector_lora else 0)
        total += lora + fwd_lm + 2 * attn + fwd_head + 2 * lora
        if projector_lora:
            total += fwd_proj  # activation grads through the projector reach its LoRA weights
    return float(total)


# ---------------------------------------------------------------- recipes

class BatchLog:
    """Per-step batch shapes (size, padded length, real tokens, lm_head positions)."""

    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def add(self, input_ids, attention_mask, head_positions: int) -> None:
        self.rows.append((int(input_ids.shape[0]), int(input_ids.shape[1]),
                          int(attention_mask.sum()), int(head_positions)))


def run_reference(method: str, preset: str, device: str, data: Path, warmup: int, steps: int,
                  seed: int, workdir: Path, profiler=None) -> dict:
    """The notebook's Trainer run; times optimizer steps warmup+1 .. warmup+steps."""
    import reference_recipe as rr
    import torch
    from transformers import TrainerCallback

    from galaxy_llava.tiny import build_model_in_memory

    log, marks = BatchLog(), {}
    # The notebook ran with PyTorch's default true-fp32 matmuls; the fast recipe's set_backends()
    # switches the process to TF32, so undo that for every reference run.
    torch.set_float32_matmul_precision("highest")

    def wrap(collator):
        def counted(features):
            batch = collator(features)
            # Reference: full-vocabulary logits at every (padded) position.
            log.add(batch["input_ids"], batch["attention_mask"], batch["input_ids"].numel())
            return batch
        return counted

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if warmup == 0:
                bc.sync(device)
                marks[0] = (time.perf_counter(), time.process_time())
                if profiler:
                    profiler.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, warmup + steps):
                bc.sync(device)
                marks[state.global_step] = (time.perf_counter(), time.process_time())
                if profiler:
                    (profiler.start if state.global_step == warmup else profiler.stop)()

    with bc.PeakMemory(device) as mem:
        torch.manual_seed(seed)
        model, processor = build_model_in_memory(preset, seed=seed, device=device, dtype=torch.float32)
        model, processor = rr.setup_tiny_llava(model, processor, device)
        trainer = rr.build_trainer(model, processor, method, str(data / "gz2_llava.jsonl"),
                                   str(workdir / f"ref-{method}"), max_steps=warmup + steps,
                                   callbacks=[Clock()], wrap_collator=wrap)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final = trainer.state.log_history[-1].get("train_loss")
    seconds, cpu = (b - a for a, b in zip(marks[warmup], marks[warmup + steps]))
    dims = model_dims(trainer.model)
    del trainer, model
    return _summary("reference", method, device, log.rows[warmup:warmup + steps], seconds, cpu, mem,
                    dims, vision=True, projector_lora=False, extra={"train_loss": final or
                                                                    (losses[-1] if losses else None)})


def run_fast(method: str, preset: str, device: str, data: Path, warmup: int, steps: int,
             seed: int, batch_size: int | None, profiler=None, compile: bool = False) -> dict:
    """galaxy_llava's fast path, run by ``step.run_steps`` over ``step.batch_source``: the very
    loop ``train._train`` runs (minus its logging and checkpoints), on the same settings."""
    import torch

    from galaxy_llava import step as gs
    from galaxy_llava.config import TrainConfig
    from galaxy_llava.data import load_records
    from galaxy_llava.features import build_feature_store
    from galaxy_llava.modeling import DEFAULT_PROMPT, apply_lora, freeze_vision_tower
    from galaxy_llava.tiny import build_model_in_memory

    log = BatchLog()
    with bc.PeakMemory(device) as mem:
        torch.manual_seed(seed)
        dev = torch.device(device)
        model, processor = build_model_in_memory(preset, seed=seed, device=device, dtype=torch.float32)
        freeze_vision_tower(model)
        if method == "lora":
            model = apply_lora(model, LORA_R, LORA_ALPHA, LORA_DROPOUT)
        gs.train_mode(model)  # as the trainer: train mode, the frozen tower in eval
        cfg = TrainConfig(method=method, data=str(data), out="unused", device=device,
                          batch_size=batch_size or REFERENCE_BATCH[method], lora_r=LORA_R,
                          lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, seed=seed,
                          compile=compile).resolved()
        records = load_records(data / "dataset.jsonl", split="train")
        records = records[: len(records) - int(0.1 * len(records))]  # the reference's 90% too
        paths = list(dict.fromkeys(r["image"] for r in records))
        t0 = time.perf_counter()
        train_data = gs.TrainData(records, processor, DEFAULT_PROMPT, paths, with_pixels=False)
        encode_s = time.perf_counter() - t0
        ac = gs.autocast_dtype(cfg.precision, dev)
        t0 = time.perf_counter()
        store = build_feature_store(
            model, processor, paths, mode="memory",
            dtype=ac if (ac is not None and dev.type == "cuda") else torch.float32, device=dev,
            batch_size=cfg.feature_batch_size,
            autocast=(lambda: torch.autocast(dev.type, dtype=ac)) if ac else None, progress=False)
        bc.sync(device)
        cache_s = time.perf_counter() - t0
        step = gs.build_training_step(model, cfg, device=dev, total_steps=warmup + steps, store=store)
        t0 = time.perf_counter()
        source = gs.batch_source(train_data, step, processor, seed=cfg.seed)
        pack_s = time.perf_counter() - t0
        done, epoch, marks, losses = 0, 0, {}, []
        t_first = time.perf_counter()  # warm-up time: one-time costs such as compiling
        if warmup == 0:
            bc.sync(device)
            marks[0] = (time.perf_counter(), time.process_time())
            if profiler:
                profiler.start()
        while done < warmup + steps:
            batches = gs.epoch_batches(len(train_data), cfg.batch_size, cfg.seed, epoch)
            batches = batches[: warmup + steps - done]  # grad_accum 1: one micro-batch per step
            for result in gs.run_steps(step, source.epoch(batches, epoch), [1] * len(batches)):
                for size, padded, tokens, labels in result.batches:
                    log.rows.append((size, padded, tokens, labels))
                losses += result.losses
                done += 1
                if done in (warmup, warmup + steps):
                    bc.sync(device)
                    marks[done] = (time.perf_counter(), time.process_time())
                    if profiler:
                        (profiler.start if done == warmup else profiler.stop)()
            epoch += 1
        final = float(torch.stack(losses[-min(len(losses), 5):]).float().mean())
    seconds, cpu = (b - a for a, b in zip(marks[warmup], marks[warmup + steps]))
    # What the warm-up steps took beyond steady-state steps (compiling, first-call allocations).
    warmup_extra = max(0.0, marks[warmup][0] - t_first - warmup * seconds / steps) if warmup else 0.0
    dims = model_dims(model)
    n_img = len(paths)
    return _summary("fast", method, device, log.rows[warmup:warmup + steps], seconds, cpu, mem, dims,
                    vision=False, projector_lora=(method == "lora"),
                    extra={"train_loss": final, "compile": compile,
                           "precision": str(ac).replace("torch.", "") if ac else "fp32",
                           "encode_s_per_sample": (encode_s + pack_s) / max(1, len(records)),
                           "feature_cache_s_per_image": cache_s / max(1, n_img),
                           "warmup_extra_s": warmup_extra})


def _summary(recipe, method, device, rows, seconds, cpu_seconds, mem, dims, vision, projector_lora,
             extra):
    samples = sum(r[0] for r in rows)
    tokens = sum(r[2] for r in rows)
    flops = sum(batch_flops(dims, method, b, lp, head, vision, projector_lora)
                for b, lp, _, head in rows)
    peak = bc.peak_bf16_flops(device)
    out = {"recipe": recipe, "method": method, "steps": len(rows), "seconds": seconds,
           "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
           "cpu_seconds": cpu_seconds, "samples_per_cpu_s": samples / max(cpu_seconds, 1e-9),
           "batch_size": rows[0][0] if rows else None,
           "flops_per_sample": flops / max(1, samples), "tflops_per_s": flops / seconds / 1e12,
           "mfu": (flops / seconds / peak) if peak else None,
           "peak_memory_bytes": mem.peak, "memory_kind": mem.kind, **extra}
    sps = out["samples_per_s"]
    job = JOB_SAMPLES / sps
    if recipe == "fast":  # one-time costs of the fast path: encode 2,000 items, cache 2,000 images,
        # and whatever the warm-up steps took beyond steady state (compiling, with --compile)
        job += JOB_IMAGES * (extra["encode_s_per_sample"] + extra["feature_cache_s_per_image"])
        job += extra.get("warmup_extra_s", 0.0)
    out["job_seconds_extrapolated"] = job
    return out


def _line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    prec = r.get("precision", "fp32") + (" +torch.compile" if r.get("compile") else "")
    return (f"{r['recipe']:9s} {r['method']:4s} bs {r['batch_size']}: {r['samples_per_s']:8.2f} samples/s "
            f"({r['samples_per_cpu_s']:.2f}/CPU-s), "
            f"{r['tokens_per_s']:9.0f} tokens/s, {r['tflops_per_s']:.3f} TFLOP/s{mfu}, "
            f"peak {bc.fmt_bytes(r['peak_memory_bytes'])} ({r['memory_kind']}), {prec}, "
            f"loss {r['train_loss']:.3f}, 3x1800 job ~{r['job_seconds_extrapolated']:.0f} s"
            + (f" (incl. {r['warmup_extra_s']:.1f} s of warm-up beyond steady state)"
               if r.get("warmup_extra_s", 0) >= 1 else ""))


def flops_table(preset: str, seq_len: int, label_tokens: int) -> list[str]:
    """Executed FLOPs per sample of each recipe and method at the given sequence shape, from the
    preset's config on the meta device (no weights, nothing run)."""
    import reference_recipe as rr
    import torch
    from peft import get_peft_model
    from transformers import LlavaForConditionalGeneration

    from galaxy_llava.modeling import apply_lora
    from galaxy_llava.tiny import tiny_config

    lines = []
    for method in ("full", "lora"):
        for recipe in ("reference", "fast"):
            with torch.device("meta"):
                model = LlavaForConditionalGeneration._from_config(tiny_config(preset))
            if method == "lora":
                if recipe == "reference":
                    model = get_peft_model(model, rr.lora_config())
                    for name, param in model.named_parameters():
                        if "vision_tower" in name and "lora_" in name:
                            param.requires_grad = False
                else:
                    model = apply_lora(model, LORA_R, LORA_ALPHA, LORA_DROPOUT)
            d = model_dims(model)
            b = REFERENCE_BATCH[method]
            head = b * seq_len if recipe == "reference" else b * label_tokens
            f = batch_flops(d, method, b, seq_len, head, vision=recipe == "reference",
                            projector_lora=(recipe == "fast" and method == "lora")) / b
            line = f"{preset} {method:4s} {recipe:9s}: {f / 1e12:.4g} TFLOP/sample"
            if recipe == "reference":
                rate = JOB_SAMPLES / NOTEBOOK_SECONDS[method]
                line += (f" (the notebook's {rate:.2f} samples/s = {rate * f / 1e12:.1f} TFLOP/s "
                         "achieved)")
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "tinyllava"])
    ap.add_argument("--method", default="lora", choices=["full", "lora"])
    ap.add_argument("--recipe", default="fast", choices=["reference", "fast"])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--compare", action="store_true", help="run both recipes, print the ratio")
    ap.add_argument("--repeats", type=int, default=1, help="with --compare: alternating repeats")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fast-batch-size", type=int, default=None,
                    help="fast recipe's batch size (default: the reference's, 1 full / 8 LoRA)")
    ap.add_argument("--compile", action="store_true",
                    help="fast recipe with the trainer's compile option (torch.compile of the "
                         "training module); its compile time falls in the warm-up steps")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one torch.profiler pass of each recipe: ms/step "
                         "by phase and the top ops (not used for the rates)")
    ap.add_argument("--flops-only", action="store_true",
                    help="print FLOPs/sample of both recipes at --seq-len/--label-tokens and exit")
    ap.add_argument("--seq-len", type=int, default=612,
                    help="with --flops-only: tokens per sample (the notebook printed 609-618)")
    ap.add_argument("--label-tokens", type=int, default=19,
                    help="with --flops-only: caption+EOS tokens (the notebook printed 14-23)")
    ap.add_argument("--samples", type=int, default=None,
                    help="synthetic galaxies (default: enough for one pass of the steps, >= 64)")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.flops_only:
        print("\n".join(flops_table(args.preset, args.seq_len, args.label_tokens)))
        return 0

    import gc
    import tempfile

    import torch

    device = bc.pick_device(args.device)
    threads = bc.set_threads(args.threads, device)
    size = 64 if args.preset == "tiny" else 336
    batch = max(REFERENCE_BATCH[args.method], args.fast_batch_size or 0)
    n = args.samples or max(64, -(-(args.warmup + args.steps) * batch * 10 // 9) + 2)
    data = bc.make_training_data(bc.CACHE / f"data-{args.preset}-{n}", n, size, args.seed)
    recipes = ["reference", "fast"] if args.compare else [args.recipe]
    results: dict[str, list[dict]] = {"reference": [], "fast": []}
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as tmp:
        for rep in range(max(1, args.repeats) if args.compare else 1):
            order = recipes if rep % 2 == 0 else recipes[::-1]
            for recipe in order:
                if recipe == "reference":
                    r = run_reference(args.method, args.preset, device, data, args.warmup,
                                      args.steps, args.seed, Path(tmp))
                else:
                    r = run_fast(args.method, args.preset, device, data, args.warmup, args.steps,
                                 args.seed, args.fast_batch_size, compile=args.compile)
                results[recipe].append(r)
                gc.collect()  # the previous recipe's model and optimizer state go first
                if device == "cuda":
                    torch.cuda.empty_cache()
        profiles = {}
        if args.profile:
            for recipe in recipes:
                prof = bc.StepProfiler(device)
                if recipe == "reference":
                    run_reference(args.method, args.preset, device, data, args.warmup, args.steps,
                                  args.seed, Path(tmp), profiler=prof)
                else:
                    run_fast(args.method, args.preset, device, data, args.warmup, args.steps,
                             args.seed, args.fast_batch_size, profiler=prof, compile=args.compile)
                profiles[recipe] = prof.summary(args.steps)
    m = bc.machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}, "
          f"torch {m['torch']}, {threads} CPU thread(s), {m['date']}")
    print(f"preset {args.preset} ({size} px), method {args.method}, device {device}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {n} galaxies")
    for recipe in ("reference", "fast"):
        for r in results[recipe]:
            print(_line(r))
    for recipe, p in profiles.items():
        print(bc.format_profile(recipe, p))
    ratio = None
    if args.compare:
        ratios = [f["samples_per_s"] / r["samples_per_s"]
                  for f, r in zip(results["fast"], results["reference"])]
        ratio = bc.median(ratios)
        cpu_ratios = [f["samples_per_cpu_s"] / r["samples_per_cpu_s"]
                      for f, r in zip(results["fast"], results["reference"])]
        print(f"fast/reference samples/s: {', '.join(f'{x:.2f}' for x in ratios)} (median {ratio:.2f})")
        print(f"fast/reference samples per process CPU-second (less sensitive to other jobs on a "
              f"shared machine): {', '.join(f'{x:.2f}' for x in cpu_ratios)} "
              f"(median {bc.median(cpu_ratios):.2f})")
        ref_job = bc.median([r["job_seconds_extrapolated"] for r in results["reference"]])
        fast_job = bc.median([r["job_seconds_extrapolated"] for r in results["fast"]])
        print(f"3 epochs x 1,800 samples extrapolated on this machine: reference {ref_job:.0f} s, "
              f"fast {fast_job:.0f} s (notebook on a Colab GPU, TinyLLaVA: "
              f"{NOTEBOOK_SECONDS[args.method]:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": m, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "profiles": profiles, "speedup": ratio,
                                         "speedup_cpu_time": bc.median(cpu_ratios) if ratio else None}, indent=2) + "\n")
    if ratio is not None:
        print(bc.speedup_line(ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
