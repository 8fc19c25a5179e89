"""The frozen vision encoder's output, computed once per image and reused at every step.

The encoder is frozen and the images are fixed, so what it hands the projector is the same every
epoch: compute it once (each process its share, then shared), keep it in memory or in a
disk-backed ``.npy`` memmap (reused across runs when model, images and dtype match), and feed it
back through the family's ``cached_features`` hook. Exact: the tests compare loss and every
gradient with the uncached forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from galaxy_llava.errors import UserError
from galaxy_llava.records import load_image

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class FeatureStore:
    """Encoder features of N images, a row per image (all rows of one shape): a CPU tensor or a
    ``.npy`` memmap (bf16 rows are stored as their raw 16-bit patterns: numpy has no bf16);
    ``extras`` holds each image's other inputs (e.g. Qwen's ``image_grid_thw``)."""

    def __init__(self, data, dtype: torch.dtype, extras: list[dict] | None = None):
        self.data, self.dtype = data, dtype
        self.extras = extras if extras is not None else [{} for _ in range(len(data))]

    def __len__(self) -> int:
        return len(self.data)

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as a CPU tensor."""
        if isinstance(self.data, torch.Tensor):
            return self.data[i]
        raw = np.array(self.data[i])
        if self.dtype == torch.bfloat16:
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)

    def inputs(self, i: int) -> dict:
        """Image ``i``'s model inputs with its cached features as ``pixel_values``."""
        return {**self.extras[i], "pixel_values": self.row(i)}


def cache_key(model, family, paths: list[str], dtype: torch.dtype, model_name: str) -> str:
    """Identity of a disk cache: model, encoder weights (a cheap fingerprint), images, dtype."""
    with torch.no_grad():
        weights = [float(p.float().sum()) for p in family.vision_encoder(model).parameters()]
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else str(model.config)
    cfg = {k: v for k, v in cfg.items() if k != "text_config"} if isinstance(cfg, dict) else cfg
    blob = json.dumps([model_name, cfg, weights, files, str(dtype)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shard(n: int, rank: int, world: int) -> range:
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def _distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def build_feature_store(model, family, processor, paths: list[str], *, mode: str,
                        dtype: torch.dtype, device: torch.device, batch_size: int = 32,
                        autocast_dtype: torch.dtype | None = None,
                        cache_dir: str | os.PathLike | None = None, model_name: str = "",
                        progress: bool = True) -> FeatureStore:
    """Run the frozen encoder once per image (``paths``); each process computes its share.

    ``mode="memory"`` keeps the rows in host memory; ``"disk"`` writes them as they come into
    ``cache_dir/features-<key>.npy`` (reused when model, images and dtype match) and reads rows
    on demand. Every image's rows must have one shape: a family whose images vary in size is
    cached only when they are all resized alike."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    stem = None
    if mode == "disk":
        stem = Path(cache_dir) / f"features-{cache_key(model, family, paths, dtype, model_name)}"
        if stem.with_suffix(".npy").is_file():
            return _open_disk(stem, dtype)
    dd, rank, world = _distributed()
    n = len(paths)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype \
        else contextlib.nullcontext
    was_training = model.training
    model.eval()

    def encode(indices):
        per_image = [family.image_inputs(processor, load_image(paths[i])) for i in indices]
        batch = {k: torch.cat([p[k] for p in per_image]).to(device) for k in per_image[0]}
        with autocast():
            feats = family.vision_features(model, batch)
        extras = [{k: v for k, v in p.items() if k != "pixel_values"} for p in per_image]
        return [r.to(dtype).cpu() for r in family.split_features(feats, batch)], extras

    shape = tuple(encode([0])[0][0].shape)  # every process learns the row shape alike
    mine = _shard(n, rank, world)
    tmp = stem.parent / f".{stem.name}.partial.npy" if stem is not None else None
    if tmp is not None:
        if rank == 0:
            stem.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_DTYPES[dtype],
                                      shape=(n, *shape)).flush()
        if dd:
            dist.barrier()
        out = np.load(tmp, mmap_mode="r+")
    else:
        out = torch.zeros((len(mine), *shape), dtype=dtype)
    extras: list[dict] = []
    chunks = [list(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    for chunk in tqdm(chunks, desc="vision features", unit="batch", disable=not progress,
                      leave=False):
        rows, chunk_extras = encode(chunk)
        if any(tuple(r.shape) != shape for r in rows):
            raise UserError("the images give encoder outputs of different sizes, which the "
                            "feature cache cannot hold: resize them alike or pass "
                            "--feature_cache off")
        block = torch.stack(rows)
        if tmp is not None:
            out[chunk[0]:chunk[-1] + 1] = (block.view(torch.int16).numpy().view(np.uint16)
                                           if dtype == torch.bfloat16 else block.numpy())
        else:
            out[chunk[0] - mine.start:chunk[-1] + 1 - mine.start] = block
        extras += chunk_extras
    model.train(was_training)
    if dd:  # every process needs every row and extra: its batches draw from them all
        parts = [None] * world
        dist.all_gather_object(parts, extras)
        extras = [e for part in parts for e in part]
    if tmp is not None:
        out.flush()
        del out
        if dd:
            dist.barrier()
        if rank == 0:
            torch.save(extras, stem.with_suffix(".extras.pt"))
            os.replace(tmp, stem.with_suffix(".npy"))
        if dd:
            dist.barrier()
        return _open_disk(stem, dtype)
    if dd:
        per = -(-n // world)
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        padded = torch.zeros((per, *shape), dtype=dtype, device=comm)
        padded[:len(out)] = out
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out = torch.cat(parts)[:n].cpu()
    return FeatureStore(out, dtype, extras)


def _open_disk(stem: Path, dtype) -> FeatureStore:
    extras = torch.load(stem.with_suffix(".extras.pt"), weights_only=True)
    return FeatureStore(np.load(stem.with_suffix(".npy"), mmap_mode="r"), dtype, extras)
