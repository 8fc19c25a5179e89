"""Save a trained model into a RUN folder and export a run as a plain checkpoint (LoRA merged).
See :mod:`galaxy_llava.models.folders` for the layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path
from galaxy_llava.models.folders import (abs_if_local, adapter_base, read_marker, read_prompt,
                                         run_kind, write_marker, write_prompt)


def save_run_model(model, processor, run: str | os.PathLike, prompt: str = DEFAULT_PROMPT,
                   base_model: str | None = None) -> Path:
    """Save a trained model into a RUN folder: ``RUN/adapter/`` for a peft model, else
    ``RUN/model/``; returns the weights folder. (The trainer saves through ``Trainer.save_model``,
    which gathers FSDP shards, then calls :func:`install_weights` likewise.)"""
    from peft import PeftModel

    run = Path(run)
    kind = "adapter" if isinstance(model, PeftModel) else "model"
    partial = run / f".{kind}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    return install_weights(run, partial, processor, prompt,
                           base_model or getattr(model, "name_or_path", None), kind)


def install_weights(run: Path, partial: Path, processor, prompt: str, base_model: str | None,
                    kind: str) -> Path:
    """Complete a saved weights folder ``partial`` (processor, prompt and base model beside the
    weights) and rename it to ``RUN/adapter`` or ``RUN/model`` in one step; the other kind, if
    any, is removed (it would shadow this one), and ``RUN/galaxy_llava.json`` names the run."""
    base_model = abs_if_local(base_model)
    (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml has it all
    processor.save_pretrained(partial)
    write_prompt(partial, prompt, kind=kind, base_model=base_model)
    for stale in (run / "adapter", run / "model"):
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(partial, run / kind)
    write_marker(run, kind="run", prompt=prompt, base_model=base_model,
                 method="lora" if kind == "adapter" else "full")
    return run / kind


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a RUN as a plain checkpoint (LoRA merged into the base weights), with its processor
    and prompt; returns ``out``."""
    import torch

    from galaxy_llava.models.loading import load_adapter_model, load_config

    run, out = Path(run), Path(out)
    kind = run_kind(run) if run.is_dir() else None
    if kind not in ("adapter", "full"):
        raise UserError(f"{run} is not a galaxy-llava run (no adapter/ or model/ folder inside)")
    prompt = read_prompt(run) or DEFAULT_PROMPT
    with atomic_path(out) as tmp:
        if kind == "full":
            shutil.copytree(run / "model", tmp)
            base = read_marker(run).get("base_model")
        else:
            base = adapter_base(run)
            # Merge in fp32 on the CPU (exact), then store in the base checkpoint's dtype.
            saved = getattr(load_config(base), "dtype", None)
            model, processor = load_adapter_model(run, device="cpu", dtype=torch.float32)
            if isinstance(saved, str):
                saved = getattr(torch, saved, None)
            if isinstance(saved, torch.dtype) and saved != torch.float32:
                model = model.to(saved)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        write_prompt(tmp, prompt, kind="model", base_model=base)
    return out
