"""Training throughput: the notebook's recipe (HF Trainer, fp32) against galaxy-llava's own trainer.

Both sides start from the same model folder (a random-initialised LLaVA of ``--preset``, written
once by ``galaxy_llava.toy.tiny.build_tiny_model`` and cached), train on the same synthetic galaxies
(real GZ2-grammar captions at the preset's image size; both train on the same 90%: the prepared
``dataset.jsonl`` marks as ``val`` exactly the 10% the notebook's ``random_split`` holds out) for
the same number of optimizer steps, at the same batch sizes, full and LoRA:

* ``reference``: ``benchmarks/reference_recipe.py``: the notebook's model load
  (``from_pretrained`` in fp32), ``GZ2LLaVADataset`` (processor called twice per item, image
  included), its ``collate_fn`` (LoRA) or Trainer's default collator (full), its
  ``TrainingArguments`` (fp32, batch 1 full / 8 LoRA, lr 1e-5 / 5e-5), full-vocabulary logits at
  every position.
* ``fast``: ``galaxy_llava.training.trainer.train(model, data, method, output_dir, **settings)``,
  the function behind ``galaxy-llava train``, with its defaults (frozen vision tower run once per
  image into an in-memory feature cache, ``lm_head`` only at label positions, fused AdamW, bf16
  autocast and TF32 on a GPU) and the reference's batch size and LoRA rank, alpha and dropout (16,
  16, 0.05; the package also adapts the projector), ``max_steps``, no checkpoints and no eval.
  ``--set KEY=VALUE`` passes any other TrainingArguments or FinetuneArguments name (for example
  ``--set feature_cache=off`` or ``--set label_only_loss=false`` to measure one part alone).

Timing: a ``TrainerCallback`` (the same on both sides) marks the end of optimizer step ``--warmup``
and of step ``--warmup + --steps``; the rates are over those timed steps. For galaxy-llava's side
the benchmark wraps ``GalaxyTrainer`` in a subclass that adds that callback and counts each
collated batch's shape, as the reference's collator is wrapped; nothing else is changed.

samples/s and tokens/s count real tokens (attention mask: prompt, image tokens and caption; not
padding) over the timed steps; peak memory is CUDA max-allocated on a GPU, else the process's peak
resident set sampled during the recipe (which includes the ~0.6 GiB of imported libraries). With
``--compare`` both recipes run in this process (``--repeats`` times, alternating which goes first)
for each ``--method``, and the last line is ``speedup: X.XXx``: the median of fast/reference
samples/s, the smallest over the methods when several run.

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
import tempfile
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
METHODS = ("full", "lora")


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


# ---------------------------------------------------------------- shared bookkeeping

class BatchLog:
    """Per-step batch shapes (size, padded length, real tokens, lm_head positions), counted on
    the collated (host) batch, so no device value is read back."""

    def __init__(self, label_only: bool = False):
        self.rows: list[tuple[int, int, int, int]] = []
        self.label_only = label_only

    def wrap(self, collator):
        def counted(features):
            batch = collator(features)
            ids = batch["input_ids"]
            # The reference (and label_only_loss=False) takes logits at every padded position.
            head = int(batch["label_mask"].sum()) if self.label_only else ids.numel()
            self.rows.append((int(ids.shape[0]), int(ids.shape[1]),
                              int(batch["attention_mask"].sum()), head))
            return batch
        return counted


def make_clock(device: str, warmup: int, steps: int, profiler=None):
    """A TrainerCallback recording (wall, process CPU) times at optimizer steps ``warmup`` and
    ``warmup + steps`` (and at train begin), starting and stopping ``profiler`` there."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: dict = {}

        def _mark(self, key) -> None:
            bc.sync(device)
            self.marks[key] = (time.perf_counter(), time.process_time())

        def on_train_begin(self, args, state, control, **kw):
            self._mark("begin")
            if warmup == 0:
                self.marks[0] = self.marks["begin"]
                if profiler:
                    profiler.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, warmup + steps):
                self._mark(state.global_step)
                if profiler:
                    (profiler.start if state.global_step == warmup else profiler.stop)()

    return Clock()


def model_folder(preset: str, seed: int, device: str) -> Path:
    """The preset's random-initialised model folder (``galaxy-llava tiny-model``), built once
    (on ``device``: seconds for ``tinyllava`` on a GPU) and cached under ``bc.CACHE``, keyed by
    the builder's source so that a changed preset or tokenizer is rebuilt."""
    import hashlib

    from galaxy_llava.toy import tiny
    from galaxy_llava.toy.tiny import build_tiny_model

    key = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:10]
    folder = bc.CACHE / f"model-{preset}-seed{seed}-{key}"
    if not (folder / "config.json").is_file():  # build_tiny_model writes the folder atomically
        build_tiny_model(folder, preset=preset, seed=seed, device=device)
    return folder


# ---------------------------------------------------------------- recipes

def run_reference(method: str, model_dir: Path, device: str, data: Path, warmup: int, steps: int,
                  workdir: Path, profiler=None) -> dict:
    """The notebook's Trainer run; times optimizer steps warmup+1 .. warmup+steps."""
    import reference_recipe as rr
    import torch

    log, clock = BatchLog(label_only=False), make_clock(device, warmup, steps, profiler)
    # The notebook ran with PyTorch's default true-fp32 matmuls; galaxy-llava's trainer turns on
    # TF32 on a GPU (TrainingArguments tf32), so undo that for every reference run.
    torch.set_float32_matmul_precision("highest")
    t_call = time.perf_counter()
    with bc.PeakMemory(device) as mem:
        model, processor = rr.load_tiny_llava(str(model_dir), device)
        trainer = rr.build_trainer(model, processor, method, str(data / "gz2_llava.jsonl"),
                                   str(workdir), max_steps=warmup + steps,
                                   callbacks=[clock], wrap_collator=log.wrap)
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final = trainer.state.log_history[-1].get("train_loss")
    dims = model_dims(trainer.model)
    extra = {"train_loss": final if final is not None else (losses[-1] if losses else None),
             "precision": "fp32", "setup_s": clock.marks["begin"][0] - t_call,
             "trainer_samples_per_s": out.metrics.get("train_samples_per_second")}
    del trainer, model
    return _summary("reference", method, device, log, clock.marks, warmup, steps, mem, dims,
                    vision=True, projector_lora=False, extra=extra)


def run_fast(method: str, model_dir: Path, device: str, data: Path, warmup: int, steps: int,
             workdir: Path, batch_size: int | None = None, settings: dict | None = None,
             profiler=None) -> dict:
    """``galaxy_llava.training.trainer.train`` on the same model folder, data and steps, with
    the clock callback and batch counting of the reference added to its ``GalaxyTrainer``."""
    import torch

    import galaxy_llava.training.trainer as gt

    settings = dict(settings or {})
    log = BatchLog(label_only=bool(settings.get("label_only_loss", True)))
    clock = make_clock(device, warmup, steps, profiler)
    made: dict = {}

    class TimedTrainer(gt.GalaxyTrainer):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), clock]
            kwargs["data_collator"] = log.wrap(kwargs["data_collator"])
            super().__init__(*args, **kwargs)
            made["trainer"] = self

    run_settings = dict(
        max_steps=warmup + steps, per_device_train_batch_size=batch_size or REFERENCE_BATCH[method],
        save_strategy="no", eval_strategy="no", report_to="none", overwrite_output_dir=True)
    if method == "lora":
        run_settings.update(lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT)
    if str(device).startswith("cpu") and torch.cuda.is_available():
        run_settings["use_cpu"] = True
    run_settings.update(settings)
    t_call = time.perf_counter()
    original, gt.GalaxyTrainer = gt.GalaxyTrainer, TimedTrainer
    try:
        with bc.PeakMemory(device) as mem:
            metrics = gt.train(str(model_dir), str(data), method, str(workdir), **run_settings)
    finally:
        gt.GalaxyTrainer = original
    trainer = made["trainer"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    final = trainer.state.log_history[-1].get("train_loss")
    dims = model_dims(trainer.model)
    n_img = metrics["train_samples"] + metrics["val_samples"]
    begin, timed_start = clock.marks["begin"][0], clock.marks[warmup][0]
    per_step = (clock.marks[warmup + steps][0] - timed_start) / steps
    extra = {"train_loss": final if final is not None else (losses[-1] if losses else None),
             "precision": metrics["precision"], "feature_cache": metrics["feature_cache"],
             "label_only_loss": metrics["label_only_loss"],
             "compile": bool(run_settings.get("torch_compile")),
             "setup_s": begin - t_call,
             "feature_cache_s_per_image": (metrics["feature_cache_seconds"] / max(1, n_img)
                                           if metrics["feature_cache"] != "off" else 0.0),
             # What the warm-up steps took beyond steady-state steps (compiling, first calls).
             "warmup_extra_s": max(0.0, timed_start - begin - warmup * per_step) if warmup else 0.0,
             "trainer_samples_per_s": metrics.get("samples_per_second")}
    del trainer, made["trainer"]
    return _summary("fast", method, device, log, clock.marks, warmup, steps, mem, dims,
                    vision=metrics["feature_cache"] == "off", projector_lora=dims["lora_proj"] > 0,
                    extra=extra)


def _summary(recipe, method, device, log: BatchLog, marks, warmup, steps, mem, dims, vision,
             projector_lora, extra):
    (t0, c0), (t1, c1) = marks[warmup], marks[warmup + steps]
    seconds, cpu_seconds = t1 - t0, c1 - c0
    rows = log.rows[warmup:warmup + steps]
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
    job = JOB_SAMPLES / out["samples_per_s"]
    if recipe == "fast":  # one-time costs of the fast path: cache 2,000 images' features, and
        # whatever the warm-up steps took beyond steady state (compiling, with torch_compile)
        job += JOB_IMAGES * extra["feature_cache_s_per_image"] + extra["warmup_extra_s"]
    out["job_seconds_extrapolated"] = job
    return out


def _line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    prec = r.get("precision", "fp32") + (" +torch.compile" if r.get("compile") else "")
    loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "n/a"
    return (f"{r['recipe']:9s} {r['method']:4s} bs {r['batch_size']}: {r['samples_per_s']:8.2f} samples/s "
            f"({r['samples_per_cpu_s']:.2f}/CPU-s), "
            f"{r['tokens_per_s']:9.0f} tokens/s, {r['tflops_per_s']:.3f} TFLOP/s{mfu}, "
            f"peak {bc.fmt_bytes(r['peak_memory_bytes'])} ({r['memory_kind']}), {prec}, "
            f"loss {loss}, 3x1800 job ~{r['job_seconds_extrapolated']:.0f} s"
            + (f" (incl. {r['warmup_extra_s']:.1f} s of warm-up beyond steady state)"
               if r.get("warmup_extra_s", 0) >= 1 else ""))


def flops_table(preset: str, seq_len: int, label_tokens: int) -> list[str]:
    """Executed FLOPs per sample of each recipe and method at the given sequence shape, from the
    preset's config on the meta device (no weights, nothing run)."""
    import reference_recipe as rr
    import torch
    from peft import get_peft_model
    from transformers import LlavaForConditionalGeneration

    from galaxy_llava.models.adapt import apply_lora
    from galaxy_llava.models.loading import quiet_peft
    from galaxy_llava.toy.tiny import tiny_config

    config = tiny_config(preset)
    lines = []
    for method in METHODS:
        for recipe in ("reference", "fast"):
            with torch.device("meta"):
                model = LlavaForConditionalGeneration._from_config(config)
            if method == "lora":
                if recipe == "reference":
                    with quiet_peft():
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


def parse_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs (values read as YAML scalars) for galaxy-llava's trainer."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    from galaxy_llava.toy.tiny import PRESETS, preset_shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS),
                    help="model shapes (galaxy_llava.toy.tiny): tiny (CPU tests), mini (TinyLLaVA's "
                         "336 px, 576 image tokens and 32,064 vocabulary on 2 narrow layers per "
                         "tower: the CPU benchmark), tinyllava (TinyLLaVA's shapes: GPU)")
    ap.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS,
                    help="one or both (default both)")
    ap.add_argument("--recipe", default="fast", choices=["reference", "fast"],
                    help="without --compare: which one to run")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    ap.add_argument("--compare", action="store_true", help="run both recipes, print the ratio")
    ap.add_argument("--repeats", type=int, default=1, help="with --compare: alternating repeats")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fast-batch-size", type=int, default=None,
                    help="galaxy-llava's batch size (default: the reference's, 1 full / 8 LoRA)")
    ap.add_argument("--compile", action="store_true",
                    help="galaxy-llava's trainer with torch_compile=True; its compile time falls "
                         "in the warm-up steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting of galaxy-llava's trainer (repeatable), e.g. "
                         "feature_cache=off, label_only_loss=false, optim=adamw_torch")
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
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and data")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    methods = list(dict.fromkeys(args.method))
    if args.flops_only:
        print("\n".join(flops_table(args.preset, args.seq_len, args.label_tokens)))
        return 0

    import gc

    import torch

    settings = parse_settings(args.set)
    if args.compile:
        settings["torch_compile"] = True
    device = bc.pick_device(args.device)
    threads = bc.set_threads(args.threads, device)
    size = preset_shapes(args.preset)["image_size"]
    batch = max(max(REFERENCE_BATCH[m] for m in methods), args.fast_batch_size or 0)
    n = args.samples or max(64, -(-(args.warmup + args.steps) * batch * 10 // 9) + 2)
    data = bc.make_training_data(bc.CACHE / f"data-{args.preset}-{n}", n, size, args.seed)
    model_dir = model_folder(args.preset, args.seed, device)
    recipes = ["reference", "fast"] if args.compare else [args.recipe]
    results: dict[str, list[dict]] = {"reference": [], "fast": []}
    profiles: dict[str, dict] = {}

    def run(recipe, method, tmp, tag, profiler=None):
        workdir = Path(tmp) / f"{recipe}-{method}-{tag}"
        if recipe == "reference":
            return run_reference(method, model_dir, device, data, args.warmup, args.steps,
                                 workdir, profiler=profiler)
        return run_fast(method, model_dir, device, data, args.warmup, args.steps, workdir,
                        args.fast_batch_size, settings, profiler=profiler)

    with tempfile.TemporaryDirectory(prefix="gl-bench-") as tmp:
        for method in methods:
            for rep in range(max(1, args.repeats) if args.compare else 1):
                for recipe in (recipes if rep % 2 == 0 else recipes[::-1]):
                    results[recipe].append(run(recipe, method, tmp, rep))
                    gc.collect()  # the previous recipe's model and optimizer state go first
                    if device == "cuda":
                        torch.cuda.empty_cache()
            if args.profile:
                for recipe in recipes:
                    prof = bc.StepProfiler(device)
                    run(recipe, method, tmp, "profile", profiler=prof)
                    profiles[f"{recipe} {method}"] = prof.summary(args.steps)
                    gc.collect()
    m = bc.machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}, "
          f"torch {m['torch']}, {threads} CPU thread(s), {m['date']}")
    print(f"preset {args.preset} ({size} px), method {' and '.join(methods)}, device {device}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {n} galaxies"
          + (f", galaxy-llava settings {settings}" if settings else ""))
    for method in methods:
        for recipe in ("reference", "fast"):
            for r in results[recipe]:
                if r["method"] == method:
                    print(_line(r))
    for name, p in profiles.items():
        print(bc.format_profile(name, p))
    speedups, cpu_speedups = {}, {}
    if args.compare:
        for method in methods:
            ref = [r for r in results["reference"] if r["method"] == method]
            fast = [r for r in results["fast"] if r["method"] == method]
            ratios = [f["samples_per_s"] / r["samples_per_s"] for f, r in zip(fast, ref)]
            cpu_ratios = [f["samples_per_cpu_s"] / r["samples_per_cpu_s"] for f, r in zip(fast, ref)]
            speedups[method], cpu_speedups[method] = bc.median(ratios), bc.median(cpu_ratios)
            print(f"{method} fast/reference samples/s: {', '.join(f'{x:.2f}' for x in ratios)} "
                  f"(median {speedups[method]:.2f}; reference "
                  f"{bc.median([r['samples_per_s'] for r in ref]):.2f}, fast "
                  f"{bc.median([f['samples_per_s'] for f in fast]):.2f} samples/s)")
            print(f"{method} fast/reference samples per process CPU-second (less sensitive to "
                  f"other jobs on a shared machine): {', '.join(f'{x:.2f}' for x in cpu_ratios)} "
                  f"(median {cpu_speedups[method]:.2f})")
            ref_job = bc.median([r["job_seconds_extrapolated"] for r in ref])
            fast_job = bc.median([r["job_seconds_extrapolated"] for r in fast])
            print(f"{method} 3 epochs x 1,800 samples extrapolated on this machine: reference "
                  f"{ref_job:.0f} s, fast {fast_job:.0f} s (notebook on a Colab GPU, TinyLLaVA: "
                  f"{NOTEBOOK_SECONDS[method]:.0f} s)")
    ratio = min(speedups.values()) if speedups else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": m, "args": {k: str(v) for k, v in vars(args).items()},
            "settings": settings, "results": results, "profiles": profiles,
            "speedups": speedups, "speedup": ratio,
            "speedup_cpu_time": min(cpu_speedups.values()) if cpu_speedups else None},
            indent=2, default=str) + "\n")
    if ratio is not None:
        if len(speedups) > 1:
            print("the speedup line below is the smallest of: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items()))
        print(bc.speedup_line(ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
