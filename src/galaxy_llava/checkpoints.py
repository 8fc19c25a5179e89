"""Run-folder bookkeeping of the trainer: resumable checkpoints, RNG states, the loss log and curve.

A checkpoint (``RUN/checkpoints/epoch-N/``, written atomically by rank 0) holds the trainable
weights (safetensors), optimizer and scheduler states, every rank's RNG states and ``state.json``
(step, epoch, loss log), which is all a resumed run needs to end with the same weights.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, write_json, write_jsonl

FORMAT = "galaxy-llava-checkpoint/1"
RUN_FILES = ("config.yaml", "train_metrics.json", "checkpoints")
# Outputs of a previous run removed on overwrite; cache/ is kept (its features are still valid).
STALE = ("checkpoints", "adapter", "model", "loss_log.jsonl", "loss_curve.png",
         "train_metrics.json", "galaxy_llava.json")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(global_step, folder) of every checkpoint of ours, oldest first; UserError if one is foreign."""
    found = []
    for state in sorted((run / "checkpoints").glob("*/state.json")):
        try:
            data = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{state.parent} is not a galaxy-llava checkpoint; cannot resume {run}")
        found.append((int(data["global_step"]), state.parent))
    return sorted(found)


def check_run_folder(run: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses a foreign folder on resume
    and an existing run without resume or overwrite."""
    run = Path(run)
    if resume:
        if not run.is_dir():
            raise UserError(f"cannot resume: run folder {run} does not exist")
        found = _checkpoints(run)
        if found:
            return found[-1][1]
        if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir():
            raise UserError(f"{run} has no checkpoint yet (the first is written when an epoch ends); "
                            "train again without --resume, adding --set overwrite=true")
        raise UserError(f"{run} is not a galaxy-llava training run (no checkpoints/*/state.json); "
                        "cannot resume it")
    if run.is_dir() and any((run / f).exists() for f in RUN_FILES) and not overwrite:
        raise UserError(f"{run} already holds a training run; pass --resume to continue it, "
                        "--set overwrite=true to start over, or choose another --out")
    return None


def prepare_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    """Create RUN (rank 0); on overwrite remove the previous run's outputs."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "checkpoints").mkdir(exist_ok=True)
    if overwrite and not resume:
        for name in STALE:
            target = run / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        (run / "checkpoints").mkdir(exist_ok=True)


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train, by name, on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run: Path, model, optimizer, scheduler, state: dict, cfg, rank: int, world: int,
                    name: str) -> Path | None:
    """Write ``RUN/checkpoints/<name>/`` (rank 0, atomically), keep the newest ``keep_checkpoints``."""
    from safetensors.torch import save_file

    if cfg.keep_checkpoints == 0:
        return None
    device = next(model.parameters()).device
    rngs = [_rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state(device))
    folder = Path(run) / "checkpoints" / name
    if rank == 0:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(trainable_state(model), tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            write_json(tmp / "state.json", {"format": FORMAT, "method": cfg.method,
                                            "world_size": world, "config": cfg.to_dict(), **state})
        for _, old in _checkpoints(Path(run))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return folder


def check_resume(folder: Path, cfg, world: int) -> None:
    """Refuse a resume that cannot continue the checkpoint, before the run folder is touched."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("method") != cfg.method:
        raise UserError(f"{folder} is a {state.get('method')} run; resume it with "
                        f"--method {state.get('method')}")
    saved = dict(state.get("config", {}), world_size=state.get("world_size", 1))
    layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": world}
    moved = [k for k, v in layout.items() if saved.get(k) != v]
    if state.get("step_in_epoch") and moved:
        # A mid-epoch position counts optimizer steps of the old batch layout: under another
        # layout it would skip or repeat examples (or never finish the epoch).
        raise UserError(f"{folder} stopped mid-epoch; resume it with the same "
                        f"{', '.join(moved)} as it was written with")


def load_checkpoint(folder: Path, model, optimizer, scheduler, rank: int, cfg) -> dict:
    """Restore weights, optimizer, scheduler and this rank's RNG states; return the saved state."""
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise UserError(f"{folder} does not match this model's trainable parameters "
                        "(another base model or LoRA settings?)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device,
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rngs = torch.load(folder / "rng.pt", weights_only=True)
    if len(rngs) != (dist.get_world_size() if dist.is_initialized() else 1):
        print(f"note: {folder} was written by {len(rngs)} processes; RNG streams are re-used by rank")
    _set_rng_state(rngs[rank % len(rngs)], device)
    changed = [k for k, v in state.get("config", {}).items()
               if k not in ("out", "overwrite") and getattr(cfg, k, v) != v]
    if changed and rank == 0:
        print(f"note: settings changed since the checkpoint: {', '.join(changed)}")
    return state


def write_log(run: Path, log: list[dict]) -> None:
    """Rewrite ``RUN/loss_log.jsonl`` (atomically) from the in-memory log."""
    write_jsonl(Path(run) / "loss_log.jsonl", log)


def append_log(run: Path, entry: dict) -> None:
    """Append one line to ``RUN/loss_log.jsonl`` (live progress between checkpoints)."""
    with open(Path(run) / "loss_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")


def plot_losses(log: list[dict], path: Path) -> Path:
    """Training and validation loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(e["step"], e["loss"]) for e in log if e["split"] == split and e["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.set_title("galaxy-llava training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
