"""One trainer for full fine-tuning and LoRA: a plain PyTorch loop over the fast path (step.py,
features.py).

Trains on the ``train`` split, reports validation loss on ``val`` each epoch, checkpoints each epoch
(resumable to the same weights as an uninterrupted run), and runs unchanged under ``torchrun`` /
``accelerate launch`` (DDP; only rank 0 writes). RUN layout: ``config.yaml``, ``loss_log.jsonl``,
``loss_curve.png``, ``train_metrics.json``, ``checkpoints/epoch-N/``, ``adapter/`` or ``model/``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from galaxy_llava import checkpoints as ckpt
from galaxy_llava.config import TrainConfig, load_config, parse_set, save_config
from galaxy_llava.errors import UserError
from galaxy_llava.features import build_feature_store, num_image_tokens
from galaxy_llava.io import write_json
from galaxy_llava.step import (
    TrainData,
    TrainStep,
    autocast_dtype,
    batch_source,
    epoch_batches,
    run_steps,
    set_backends,
    train_mode,
)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _device(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    if cfg.device:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None and world > 1:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _all_mean(value: float, device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / world


def _evaluate(step: TrainStep, source, cfg, rank, world) -> float | None:
    batches = epoch_batches(len(source), cfg.eval_batch_size or cfg.batch_size, 0, 0, rank, world,
                            shuffle=False)
    step.model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=step.device), 0
    for b in source.epoch(batches):
        s, n = step.eval_sums(b.inputs, b.label_count)
        total, count = total + s, count + n
    train_mode(step.model)
    total = torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                             device=step.device)])
    if world > 1:
        dist.all_reduce(total)
    val = float(total[0] / total[1]) if total[1] > 0 else None
    return val if val is not None and math.isfinite(val) else None


def resolve_config(model=None, data=None, method=None, out=None, config=None, resume=False,
                   **overrides) -> TrainConfig:
    """Defaults < saved RUN/config.yaml (on resume) < ``config`` (YAML path or TrainConfig) < args."""
    base = config if isinstance(config, TrainConfig) else None
    if base is None and resume and out is not None and (Path(out) / "config.yaml").is_file():
        base = load_config(Path(out) / "config.yaml")
    yaml_path = config if config is not None and not isinstance(config, TrainConfig) else None
    named = dict(model=model, data=data, method=method, out=out)  # None here: not given
    explicit = {**{k: v for k, v in named.items() if v is not None}, **overrides}
    cfg = load_config(yaml_path, explicit, base=base).resolved()
    # Saved absolute, so `--resume` works from any working directory.
    for key in ("model", "data"):
        value = getattr(cfg, key)
        if value is not None and Path(value).expanduser().exists():
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    for key in ("data", "out"):
        if getattr(cfg, key) is None:
            raise UserError(f"no {key} given: pass --{key}")
    return cfg


def train(model=None, data=None, method=None, out=None, config=None, resume: bool = False,
          **overrides) -> dict:
    """Fine-tune ``model`` on ``data``'s train split (full or LoRA); returns train_metrics.

    ``config``: a TrainConfig or a YAML path; ``overrides``: any TrainConfig field."""
    cfg = resolve_config(model, data, method, out, config, resume, **overrides)
    rank, local_rank, world = _dist_env()
    device = _device(cfg, local_rank, world)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, resume, rank, world, device)
    finally:
        if own_group:
            dist.destroy_process_group()


def _resume(folder: Path, step: TrainStep, rank: int, cfg: TrainConfig) -> dict:
    state = ckpt.load_checkpoint(folder, step.model, step.optimizer, step.scheduler, rank, cfg)
    # The schedule follows this run's total (epochs / max_steps may have grown on resume);
    # unchanged, this recomputes the very value the optimizer already holds.
    sched = step.scheduler
    for group, base, f in zip(step.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in step.optimizer.param_groups]
    if rank == 0:
        print(f"resuming from {folder} (step {state['global_step']})")
    return state


def _train(cfg: TrainConfig, resume: bool, rank: int, world: int, device) -> dict:
    from tqdm.auto import tqdm

    from galaxy_llava.data import load_records
    from galaxy_llava.modeling import (
        apply_lora,
        count_parameters,
        freeze_vision_tower,
        load_model,
        save_run_model,
    )

    t_start = time.time()
    run, main = Path(cfg.out), rank == 0
    resume_from = ckpt.check_run_folder(run, resume, cfg.overwrite)
    if resume_from is not None:
        ckpt.check_resume(resume_from, cfg, world)
    records = load_records(cfg.data)
    train_recs = [r for r in records if r.get("split") == "train"]
    val_recs = [r for r in records if r.get("split") == "val"]
    if not train_recs:
        raise UserError(f"{cfg.data} has no train split; prepare it with `galaxy-llava prepare`")
    if not val_recs and main:
        print("note: no val split; validation loss is skipped")
    ckpt.seed_everything(cfg.seed)
    set_backends(cfg, device)
    model, processor = load_model(cfg.model, device=device, dtype=torch.float32)
    freeze_vision_tower(model)
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_projector)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_mode(model)
    if world > 1:  # every rank inspects the folder before rank 0 changes it
        dist.barrier()
    # The folder is touched only once data and model have loaded: a typo leaves nothing behind.
    if main:
        ckpt.prepare_run_folder(run, resume, cfg.overwrite)
        save_config(cfg, run / "config.yaml")
    trainable, total_params = count_parameters(model)
    if main:
        print(f"{cfg.method}: {trainable:,} trainable of {total_params:,} parameters "
              f"({100 * trainable / total_params:.2f}%) on {device}, world size {world}")

    paths = list(dict.fromkeys(r["image"] for r in train_recs + val_recs))
    cached = cfg.feature_cache != "off"
    train_data = TrainData(train_recs, processor, cfg.prompt, paths, with_pixels=not cached)
    val_data = TrainData(val_recs, processor, cfg.prompt, paths, with_pixels=not cached)
    t_feat = time.time()
    store = None
    ac = autocast_dtype(cfg.precision, device)
    if cached:
        if num_image_tokens(model.config) != len(train_data.examples[0]["input_ids"][
                train_data.examples[0]["input_ids"] == model.config.image_token_id]):
            raise UserError("the processor's image-token count does not match the model's features")
        store = build_feature_store(
            model, processor, paths, mode=cfg.feature_cache,
            dtype=ac if (ac is not None and device.type == "cuda") else torch.float32,
            device=device, batch_size=cfg.feature_batch_size, num_workers=cfg.num_workers,
            autocast=(lambda: torch.autocast(device.type, dtype=ac)) if ac else None,
            cache_dir=cfg.feature_cache_dir or run / "cache", model_name=cfg.model,
            rank=rank, world=world, progress=main)
    feature_seconds = time.time() - t_feat

    n_micro = len(epoch_batches(len(train_data), cfg.batch_size, cfg.seed, 0, rank, world))
    per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total_steps = math.ceil(cfg.epochs * per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    step = TrainStep(model, cfg, device, total_steps, store=store, ddp=world > 1)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "log": []}
    if resume_from is not None:
        state = _resume(resume_from, step, rank, cfg)
    if state["global_step"] >= total_steps and (run / "train_metrics.json").is_file():
        # Nothing left to train: keep the finished run's outputs and timings as they are.
        if main:
            print(f"{run} already finished {total_steps} steps; raise --epochs or --max-steps "
                  "to train further")
        return json.loads((run / "train_metrics.json").read_text())
    log = state["log"]
    if main:  # drop entries a crash left after the checkpoint
        ckpt.write_log(run, log)
    train_source = batch_source(train_data, step, processor, cfg.num_workers, cfg.seed)
    val_source = batch_source(val_data, step, processor, cfg.num_workers, cfg.seed)
    gstep, samples, tokens, running = state["global_step"], 0, 0, []
    bar = tqdm(total=total_steps, initial=gstep, desc=f"train {cfg.method}", unit="step",
               disable=not main)
    t_train = time.time()
    epoch = state["epoch"]
    while gstep < total_steps:
        batches = epoch_batches(len(train_data), cfg.batch_size, cfg.seed, epoch, rank, world)
        groups = [batches[i:i + cfg.grad_accum] for i in range(0, len(batches), cfg.grad_accum)]
        in_epoch = state["step_in_epoch"] if epoch == state["epoch"] else 0
        todo = groups[in_epoch:in_epoch + (total_steps - gstep)]
        micro = train_source.epoch([b for g in todo for b in g], epoch)
        for result in run_steps(step, micro, [len(g) for g in todo]):
            samples += result.samples * world
            tokens += result.tokens * world
            running += result.losses
            lr = result.lr
            gstep, in_epoch = gstep + 1, in_epoch + 1
            bar.update(1)
            if gstep % cfg.log_every == 0 or gstep == total_steps or in_epoch == len(groups):
                # The only read-back of the loss: once per log_every steps.
                value = _all_mean(float(torch.stack(running).float().mean()), device, world)
                running = []
                if not math.isfinite(value) and main:
                    bar.write(f"warning: training loss is {value} at step {gstep}; lower --lr?")
                log.append({"step": gstep, "epoch": round(epoch + in_epoch / len(groups), 4),
                            "loss": value if math.isfinite(value) else None, "split": "train",
                            "lr": lr})
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if main:  # appended live; rewritten whole (atomically) at each checkpoint
                    ckpt.append_log(run, log[-1])
        finished_epoch = in_epoch == len(groups)
        if val_recs:
            val = _evaluate(step, val_source, cfg, rank, world)
            log.append({"step": gstep, "epoch": round(epoch + in_epoch / len(groups), 4), "loss": val,
                        "split": "val", "lr": step.scheduler.get_last_lr()[0]})
            if main:
                bar.write(f"epoch {epoch + 1}: val loss {_fmt(val)}")
        epoch, state["step_in_epoch"] = (epoch + 1, 0) if finished_epoch else (epoch, in_epoch)
        state.update(epoch=epoch, global_step=gstep, log=log)
        if main:
            ckpt.write_log(run, log)
        ckpt.save_checkpoint(run, model, step.optimizer, step.scheduler, state, cfg, rank, world,
                             name=f"epoch-{epoch}" if finished_epoch else f"step-{gstep}")
    bar.close()
    train_seconds = time.time() - t_train

    metrics = {
        "method": cfg.method, "model": cfg.model, "device": str(device), "world_size": world,
        "precision": "bf16 autocast" if ac else "fp32",
        "feature_cache": cfg.feature_cache, "label_only_loss": cfg.label_only_loss,
        "train_samples": len(train_recs), "val_samples": len(val_recs), "steps": gstep,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "trainable_parameters": trainable, "total_parameters": total_params,
        "wall_seconds": time.time() - t_start, "feature_cache_seconds": feature_seconds,
        "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds if samples else None,
        "tokens_per_second": tokens / train_seconds if tokens else None,
        "final_train_loss": next((e["loss"] for e in reversed(log) if e["split"] == "train"), None),
        "val_losses": [{"epoch": e["epoch"], "step": e["step"], "loss": e["loss"]}
                       for e in log if e["split"] == "val"],
    }
    if main:
        save_run_model(model, processor, run, prompt=cfg.prompt, base_model=cfg.model)
        ckpt.plot_losses(log, run / "loss_curve.png")
        write_json(run / "train_metrics.json", metrics)
        print(f"trained in {train_seconds:.0f} s ({metrics['samples_per_second'] or 0:.2f} samples/s); "
              f"final train loss {_fmt(metrics['final_train_loss'])}; wrote {run}")
    if world > 1:
        dist.barrier()
    return metrics


def train_from_cli(args) -> dict:
    """``galaxy-llava train``: flags given (not None) and ``--set KEY=VALUE`` override the YAML."""
    flags = {k: getattr(args, k, None) for k in
             ("model", "data", "method", "out", "epochs", "batch_size", "lr", "lora_r",
              "lora_alpha", "lora_dropout", "max_steps", "seed")}
    flags = {k: v for k, v in flags.items() if v is not None}
    flags.update(parse_set(getattr(args, "set", None)))
    return train(config=args.config, resume=bool(args.resume), **flags)
