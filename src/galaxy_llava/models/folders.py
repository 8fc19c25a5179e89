"""The folders galaxy-llava writes around Hugging Face weights, and how to tell them apart.

* a *model folder*: a plain Hugging Face checkpoint (``config.json``, ``*.safetensors``, processor
  files) plus ``galaxy_llava.json`` = ``{"kind": "model", "prompt", "base_model"}``;
* a *RUN folder* (written by the trainer): ``RUN/model/`` (full fine-tune, a model folder) or
  ``RUN/adapter/`` (peft LoRA adapter with the processor beside it, ``galaxy_llava.json`` kind
  ``"adapter"``), and ``RUN/galaxy_llava.json`` kind ``"run"``.

Pure file logic: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json

MARKER = "galaxy_llava.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local(name: str) -> bool:
    """A path (existing, or not shaped like a Hub id ``org/name``) rather than a Hub id."""
    return Path(name).expanduser().exists() or not _HUB_ID.match(name)


def abs_if_local(name: str | None) -> str | None:
    """An existing local path made absolute (so a run works from any folder); Hub ids unchanged."""
    if name and is_local(name) and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def read_marker(folder: str | os.PathLike) -> dict:
    """``folder/galaxy_llava.json`` as a dict ({} when absent)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    return data if isinstance(data, dict) else {}


def write_marker(folder: str | os.PathLike, **fields: Any) -> None:
    """Merge ``fields`` (None values skipped) into ``folder/galaxy_llava.json``, atomically."""
    data = {**read_marker(folder), **{k: v for k, v in fields.items() if v is not None}}
    write_json(Path(folder) / MARKER, data)


def write_prompt(folder: str | os.PathLike, prompt: str, kind: str | None = None,
                 base_model: str | None = None) -> None:
    """Store the prompt a model was trained with in ``folder/galaxy_llava.json``, by the model."""
    write_marker(folder, prompt=prompt, kind=kind, base_model=base_model)


def read_prompt(folder: str | os.PathLike) -> str | None:
    """The prompt stored with a model, adapter or RUN folder, or None when none is stored."""
    folder = Path(folder)
    for f in (folder, folder / "model", folder / "adapter"):
        prompt = read_marker(f).get("prompt")
        if prompt:
            return prompt
    return None


def run_kind(path: str | os.PathLike) -> str | None:
    """'adapter', 'full' (RUN folders), 'model' (a plain checkpoint folder) or None."""
    path = Path(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (path / "model" / "config.json").is_file():
        return "full"
    if (path / "config.json").is_file():
        return "model"
    return None


def adapter_base(run: str | os.PathLike) -> str:
    """The base model of a LoRA run: from our marker, else from peft's adapter_config.json."""
    run = Path(run)
    base = read_marker(run).get("base_model") or read_marker(run / "adapter").get("base_model")
    if not base:
        cfg = run / "adapter" / "adapter_config.json"
        if cfg.is_file():
            base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter in {run} does not name its base model; "
                        f"add \"base_model\" to {run / MARKER}")
    if is_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(f"the base model of the adapter in {run}, {base}, was not found; "
                        f"set \"base_model\" in {run / MARKER} to its folder or Hub id")
    return base
