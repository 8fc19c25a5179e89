"""The fast path's training step, below the trainer's orchestration (train.py): examples tokenised
once, epoch batches, batch sources (packed device tensors or a DataLoader), :class:`TrainStep`
(forward/backward, optimizer, schedule) and :func:`run_steps`, the loop's core shared with
``benchmarks/train_throughput.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from galaxy_llava.config import TrainConfig
from galaxy_llava.features import IGNORE, LlavaTrainModule, use_lean_lora

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
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
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


def train_mode(model) -> None:
    """Train mode, except the frozen tower: a fixed feature extractor (as its cached features)."""
    from galaxy_llava.features import llava_parts

    model.train()
    llava_parts(model).vision_tower.eval()
