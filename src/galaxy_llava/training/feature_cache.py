"""The frozen vision encoder's output, computed once per image and reused at every step.

The encoder is frozen and the images are fixed, so what it hands the projector is the same every
epoch: compute it once (each process its share, then shared), keep it in memory or in a
disk-backed ``.npy`` memmap (reused across runs when model, images and dtype match), and feed it
back through the family's ``cached_features`` hook. Exact: the tests compare loss and every
gradient with the uncached forward.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class FeatureStore:
    """Encoder features of N images, a row per image: a CPU tensor or a ``.npy`` memmap (bf16
    rows are stored as their raw 16-bit patterns: numpy has no bf16)."""

    def __init__(self, data, dtype: torch.dtype):
        self.data, self.dtype = data, dtype

    def __len__(self) -> int:
        return len(self.data)

    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` as a CPU tensor (what a dataset item carries)."""
        if isinstance(self.data, torch.Tensor):
            return self.data[i]
        raw = np.array(self.data[i])
        if self.dtype == torch.bfloat16:
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


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

    ``mode="memory"`` keeps the rows in host memory; ``"disk"`` writes
    ``cache_dir/features-<key>.npy`` (reused when model, images and dtype match) and reads rows
    on demand."""
    import contextlib

    import torch.distributed as dist
    from tqdm.auto import tqdm

    from galaxy_llava.records import load_image

    dd, rank, world = _distributed()
    n, (t, d) = len(paths), family.feature_shape(model.config)
    final = disk = None
    if mode == "disk":
        cache_dir = Path(cache_dir)
        final = cache_dir / f"features-{cache_key(model, family, paths, dtype, model_name)}.npy"
        if final.is_file():
            return FeatureStore(np.load(final, mmap_mode="r"), dtype)
        tmp = cache_dir / f".{final.name}.partial"
        if rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_DTYPES[dtype],
                                      shape=(n, t, d)).flush()
        if dd:
            dist.barrier()
        disk = np.load(tmp, mmap_mode="r+")
    mine = _shard(n, rank, world)
    out = torch.zeros((len(mine), t, d), dtype=dtype) if disk is None else None
    chunks = [list(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    was_training = model.training
    model.eval()
    done = 0
    for chunk in tqdm(chunks, desc="vision features", unit="batch", disable=not progress,
                      leave=False):
        pixels = family.pixel_values(processor, [load_image(paths[i]) for i in chunk])
        pixels = pixels.to(device)
        with (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
              else contextlib.nullcontext()):
            rows = family.vision_features(model, pixels).to(dtype).cpu()
        if disk is None:
            out[done:done + len(chunk)] = rows
        else:
            disk[chunk[0]:chunk[-1] + 1] = (rows.view(torch.int16).numpy().view(np.uint16)
                                            if dtype == torch.bfloat16 else rows.numpy())
        done += len(chunk)
    model.train(was_training)
    if disk is not None:
        disk.flush()
        del disk
        if dd:
            dist.barrier()
        if rank == 0:
            os.replace(tmp, final)
        if dd:
            dist.barrier()
        return FeatureStore(np.load(final, mmap_mode="r"), dtype)
    if dd:  # every process needs every row: its shuffled batches draw from the whole set
        per = -(-n // world)
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        padded = torch.zeros((per, t, d), dtype=dtype, device=comm)
        padded[:len(mine)] = out
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out = torch.cat(gathered)[:n].cpu()
    return FeatureStore(out, dtype)
