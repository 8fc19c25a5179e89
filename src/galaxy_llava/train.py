"""One trainer for full fine-tuning and LoRA: a plain PyTorch loop over the fast path (features.py).

Trains on the ``train`` split, reports validation loss on ``val`` each epoch, checkpoints each epoch
(resumable to the same weights as an uninterrupted run), and runs unchanged under ``torchrun`` /
``accelerate launch`` (DDP; only rank 0 writes). RUN layout: ``config.yaml``, ``loss_log.jsonl``,
``loss_curve.png``, ``train_metrics.json``, ``checkpoints/epoch-N/``, ``adapter/`` or ``model/``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from galaxy_llava import checkpoints as ckpt
from galaxy_llava.config import TrainConfig, load_config, parse_set, save_config
from galaxy_llava.errors import UserError
from galaxy_llava.features import (
    IGNORE,
    LlavaTrainModule,
    build_feature_store,
    num_image_tokens,
    use_lean_lora,
)
from galaxy_llava.io import write_json

# ----------------------------------------------------------------- data


class TrainData(torch.utils.data.Dataset):
    """Examples tokenised once (prompt, caption + EOS, labels) with their image's row index.

    Items carry ``image_index``; without a feature store they also carry ``pixel_values``, loaded
    and processed per item (the uncached path)."""

    def __init__(self, records, processor, prompt, paths: list[str], with_pixels: bool):
        from galaxy_llava.data import encode_text
        from galaxy_llava.data import num_image_tokens as processor_image_tokens

        n_img = processor_image_tokens(processor)
        row = {p: i for i, p in enumerate(paths)}
        self.examples = [encode_text(processor.tokenizer, r["text"], prompt, n_img) for r in records]
        self.image_index = [row[r["image"]] for r in records]
        self.paths, self.processor, self.with_pixels = paths, processor, with_pixels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        from galaxy_llava.data import load_image, pixel_values

        item = dict(self.examples[i], image_index=torch.tensor(self.image_index[i]))
        if self.with_pixels:
            item["pixel_values"] = pixel_values(self.processor,
                                                load_image(self.paths[self.image_index[i]]))
        return item


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation from (seed, epoch), sharded like
    DistributedSampler (padded by wrapping so every rank takes as many steps)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        order += order[: (-len(order)) % world]
    else:
        order = list(range(n))
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@dataclass
class Batch:
    """One micro-batch: ``inputs`` for :class:`LlavaTrainModule` (on the device) and its shape
    counted on the host, so that progress and throughput never wait for the device."""

    inputs: dict
    samples: int
    tokens: int        # real tokens (prompt, image tokens, caption + EOS), not padding
    padded_len: int
    label_count: int   # caption + EOS tokens: the positions the loss (and lm_head) covers


class PackedData:
    """The tokenised examples padded once into [N, Lmax] tensors on the device (the path with
    cached vision features): a micro-batch is an ``index_select`` and a slice to its longest row,
    plus the feature rows of its images. The same right-padded tensors ``Collator`` builds, without
    per-step Python collation, a DataLoader or host-to-device copies; label positions and targets
    for the loss are built on the host once per epoch and copied in one transfer.

    No attention mask is passed: padding only ever follows a row's last real token, so under
    causal attention no real token sees it, and padded positions carry no label; loss and
    gradients are those of the masked computation (``tests/test_train.py`` checks it against the
    Hugging Face forward with the mask)."""

    def __init__(self, data: TrainData, store, pad_token_id: int, image_token_id: int,
                 device, label_only: bool = True):
        ex = data.examples
        self.device, self.store, self.label_only = torch.device(device), store, label_only
        self.lengths = [len(e["input_ids"]) for e in ex]
        n, width = len(ex), max(self.lengths, default=1)
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        for i, e in enumerate(ex):
            ids[i, :len(e["input_ids"])] = e["input_ids"]
            labels[i, :len(e["labels"])] = e["labels"]
        # Next-token positions t (label at t+1) and their targets, per example, on the host.
        self.label_pos = [(e["labels"][1:] != IGNORE).nonzero().flatten().tolist() for e in ex]
        self.label_tgt = [e["labels"][1:][e["labels"][1:] != IGNORE].tolist() for e in ex]
        self.image_start = self._image_start(ex, image_token_id)
        self.ids, self.labels = ids.to(self.device), labels.to(self.device)
        self.image_rows = list(data.image_index)
        # In-memory features are gathered on their device; a disk memmap by host indices.
        data_rows = getattr(store, "data", None)
        self._rows_device = data_rows.device if isinstance(data_rows, torch.Tensor) else None

    @staticmethod
    def _image_start(examples, image_token_id: int) -> int | None:
        """Start of the image tokens when every example has them as one span at the same place."""
        starts = set()
        for e in examples:
            pos = (e["input_ids"] == image_token_id).nonzero().flatten()
            if len(pos) == 0 or int(pos[-1] - pos[0]) + 1 != len(pos):
                return None
            starts.add(int(pos[0]))
        return starts.pop() if len(starts) == 1 else None

    def __len__(self) -> int:
        return len(self.lengths)

    def epoch(self, batches: list[list[int]], epoch: int = 0) -> Iterator[Batch]:
        """The micro-batches ``batches`` (lists of example indices), in order."""
        if not batches:
            return
        flat = [i for b in batches for i in b]
        order = torch.tensor(flat, dtype=torch.long).to(self.device, non_blocking=True)
        rows = [self.image_rows[i] for i in flat]
        rows_t = (torch.tensor(rows, dtype=torch.long).to(self._rows_device, non_blocking=True)
                  if self._rows_device is not None else None)
        widths, pos, tgt, cuts = [], [], [], [0]
        for b in batches:
            width = max(self.lengths[i] for i in b)
            widths.append(width)
            if self.label_only:
                for r, i in enumerate(b):
                    base = r * width
                    pos.extend(base + t for t in self.label_pos[i])
                    tgt.extend(self.label_tgt[i])
            cuts.append(len(pos))
        if self.label_only:
            both = torch.tensor([pos, tgt], dtype=torch.long).to(self.device, non_blocking=True)
            pos_t, tgt_t = both[0], both[1]
        a = 0
        for k, b in enumerate(batches):
            m, width = len(b), widths[k]
            idx = order[a:a + m]
            inputs = {"input_ids": self.ids[:, :width].index_select(0, idx)}
            if self.image_start is not None:
                inputs["image_start"] = self.image_start
            if self.label_only:
                inputs["label_positions"] = pos_t[cuts[k]:cuts[k + 1]]
                inputs["label_targets"] = tgt_t[cuts[k]:cuts[k + 1]]
            else:
                inputs["labels"] = self.labels[:, :width].index_select(0, idx)
            if rows_t is not None:
                inputs["features"] = self.store.data.index_select(0, rows_t[a:a + m]).to(
                    self.device, non_blocking=True)
            else:
                inputs["features"] = self.store.get(rows[a:a + m], self.device)
            yield Batch(inputs, m, sum(self.lengths[i] for i in b), width,
                        sum(len(self.label_pos[i]) for i in b))
            a += m


class LoaderData:
    """Micro-batches through a DataLoader and ``Collator`` (the path without a feature cache:
    images are loaded and processed per item, in ``num_workers`` processes)."""

    def __init__(self, data: TrainData, step: TrainStep, collate, num_workers: int = 0,
                 seed: int = 0):
        self.data, self.step, self.collate = data, step, collate
        self.num_workers, self.seed = num_workers, seed

    def __len__(self) -> int:
        return len(self.data)

    def epoch(self, batches: list[list[int]], epoch: int = 0) -> Iterator[Batch]:
        """The micro-batches ``batches``, in order (``epoch`` seeds the loader's generator)."""
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            self.data, batch_sampler=batches, collate_fn=self.collate,
            num_workers=self.num_workers if self.data.with_pixels else 0,
            generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for cpu in loader:
            n_labels = int((cpu["labels"][:, 1:] != IGNORE).sum())  # host copy: no sync
            yield Batch(self.step.to_device(cpu), len(cpu["input_ids"]),
                        int(cpu["attention_mask"].sum()), cpu["input_ids"].shape[1], n_labels)


def batch_source(data: TrainData, step: TrainStep, processor, num_workers: int = 0,
                 seed: int = 0):
    """:class:`PackedData` when ``step`` trains from cached features, else :class:`LoaderData`."""
    from galaxy_llava.data import Collator

    pad = processor.tokenizer.pad_token_id
    if step.store is not None and not data.with_pixels:
        image_id = llava_config(step.model).image_token_id
        return PackedData(data, step.store, pad, image_id, step.device, step.cfg.label_only_loss)
    return LoaderData(data, step, Collator(pad), num_workers, seed)


def llava_config(model):
    """The LlavaConfig of a (possibly peft-wrapped) model."""
    from galaxy_llava.features import llava_parts

    return llava_parts(model).config


@dataclass
class StepResult:
    """What one optimizer step did: its micro-batches' (detached, device) losses, the lr it used,
    and its work counted on the host."""

    losses: list
    lr: float
    samples: int
    tokens: int
    batches: list  # (samples, padded_len, tokens, label_count) per micro-batch


def run_steps(step: TrainStep, micro: Iterator[Batch], group_sizes: Iterable[int]
              ) -> Iterator[StepResult]:
    """The training loop's core, shared by the trainer and ``benchmarks/train_throughput.py``:
    for each optimizer step, forward/backward ``size`` micro-batches from ``micro`` (gradients
    accumulated, scaled by 1/size; DDP syncs on the last), then clip, step and schedule.

    Yields after each optimizer step; nothing here reads a value back from the device."""
    for size in group_sizes:
        losses, samples, tokens, shapes = [], 0, 0, []
        for k in range(size):
            b = next(micro)
            losses.append(step.forward_backward(b.inputs, 1 / size, sync=k == size - 1))
            samples, tokens = samples + b.samples, tokens + b.tokens
            shapes.append((b.samples, b.padded_len, b.tokens, b.label_count))
        lr = step.scheduler.get_last_lr()[0]
        step.optimizer_step()
        yield StepResult(losses, lr, samples, tokens, shapes)


# ----------------------------------------------------------------- one training step


class TrainStep:
    """Forward/backward/optimizer step of the fast path, usable without the CLI (benchmarks).

    ``step(batch)`` runs a whole optimizer step on one batch; the trainer uses ``forward_backward``
    and ``optimizer_step`` for gradient accumulation. Batches come from :meth:`to_device`."""

    def __init__(self, model, cfg: TrainConfig, device, total_steps: int, store=None, ddp=False):
        self.model, self.cfg, self.device, self.store = model, cfg, torch.device(device), store
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The same LoRA sum with fewer passes over the activations; on the CPU, dropout masks of
        # the same distribution from ~p x the random draws (see features.SampledDropout; its
        # data-dependent draw count would break torch.compile's graph, so not with compile).
        use_lean_lora(model, sampled_dropout=self.device.type == "cpu" and not cfg.compile)
        module = LlavaTrainModule(model, cfg.label_only_loss, lean=True)
        if ddp:
            # Buffers (rotary inv_freq, position ids) are constants: no per-step broadcast.
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
                nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **{sync: False})
        self.plain_module = module.module if ddp else module
        self.module = torch.compile(module) if cfg.compile else module
        self.ddp = ddp
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]  # biases and norms, as HF Trainer
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        try:  # fused kernels: one launch per step on GPUs, ~6x faster than foreach on CPU too
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, total_steps, cfg.warmup_ratio))

    def autocast(self):
        """bf16 autocast over fp32 master weights, or nothing (fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, batch: dict) -> dict:
        """Move a collated batch to the device; cached features replace ``image_index``."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
               if k != "image_index"}
        if self.store is not None:
            out["features"] = self.store.get(batch["image_index"], self.device)
        return out

    def forward_backward(self, batch: dict, scale: float = 1.0, sync: bool = True) -> torch.Tensor:
        """Detached loss of one (device) batch; gradients accumulate (DDP all-reduces if ``sync``)."""
        no_sync = self.module.no_sync if (self.ddp and not sync) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                loss = self.module(**batch)
            (loss if scale == 1 else loss * scale).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        """Clip, step, schedule, zero the gradients."""
        if self.cfg.max_grad_norm:
            # foreach: the same per-tensor norms, in one call instead of one per parameter
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: dict) -> float:
        """One full optimizer step on one device batch; returns the loss."""
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return float(loss)

    @torch.no_grad()
    def eval_sums(self, batch: dict, n: int | None = None) -> tuple[torch.Tensor, int]:
        """(loss x label tokens (a device scalar), label tokens) of one batch, for a
        token-weighted mean; ``n`` counted on the host when known."""
        if n is None:
            n = int((batch["labels"][:, 1:] != -100).sum())
        with self.autocast():  # not through DDP: ranks may hold unequal numbers of val batches
            loss = self.plain_module(**batch)
        return loss.detach().double() * n, n


def autocast_dtype(precision: str, device: torch.device):
    """bf16 for "bf16", or "auto" on a GPU with bf16; None (fp32) otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def lr_lambda(kind: str, total: int, warmup_ratio: float):
    """LR multiplier per step: linear warmup, then linear/cosine decay to 0 or constant."""
    warmup = math.ceil(total * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - frac) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1, frac)))
    return f


def build_training_step(model, cfg: TrainConfig, device=None, total_steps: int = 1000,
                        store=None) -> TrainStep:
    """A :class:`TrainStep` for ``model`` (already frozen / LoRA-wrapped) under ``cfg``."""
    from galaxy_llava.modeling import resolve_device

    device = resolve_device(device or cfg.device)
    set_backends(cfg, device)
    return TrainStep(model, cfg.resolved(), device, total_steps, store=store)


def set_backends(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls on Ampere+ (fp32 parts stay fast) when allowed."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


# ----------------------------------------------------------------- the trainer


def train_mode(model) -> None:
    """Train mode, except the frozen tower: a fixed feature extractor (as its cached features)."""
    from galaxy_llava.features import llava_parts

    model.train()
    llava_parts(model).vision_tower.eval()


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
    explicit = dict(model=model, data=data, method=method, out=out, **overrides)
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
