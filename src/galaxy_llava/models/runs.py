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
    ``RUN/model/``; the processor beside the weights, the prompt, base model and kind in
    galaxy_llava.json files. Returns the weights folder."""
    from peft import PeftModel

    run = Path(run)
    base_model = abs_if_local(base_model or getattr(model, "name_or_path", None))
    is_adapter = isinstance(model, PeftModel)
    folder = run / ("adapter" if is_adapter else "model")
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_prompt(tmp, prompt, kind="adapter" if is_adapter else "model", base_model=base_model)
    # Only one kind of weights per run: a stale folder of the other kind would shadow this one.
    shutil.rmtree(run / ("model" if is_adapter else "adapter"), ignore_errors=True)
    write_marker(run, kind="run", prompt=prompt, base_model=base_model,
                 method="lora" if is_adapter else "full")
    return folder


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
