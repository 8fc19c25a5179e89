"""The folders galaxy-llava writes around Hugging Face weights, and how to tell them apart.

* a *model folder*: a plain Hugging Face checkpoint (``config.json``, ``*.safetensors``, processor
  files) plus ``galaxy_llava.json`` = ``{"kind": "model", "prompt", "base_model"}``;
* a *RUN folder* (written by the trainer): ``RUN/model/`` (full fine-tune, a model folder) or
  ``RUN/adapter/`` (peft LoRA adapter with the processor beside it, ``galaxy_llava.json`` kind
  ``"adapter"``), and ``RUN/galaxy_llava.json`` kind ``"run"``; ``RUN/config.yaml`` holds the
  run's settings (:func:`run_settings`);
* a *checkpoint* ``RUN/checkpoint-N/`` (the Trainer's): a model folder (full) or an adapter
  folder (LoRA) with the Trainer's state beside it; its prompt and base model are its run's.

Paths in ``config.yaml`` work from any working directory (:func:`portable_settings`): a path
inside the run folder is stored relative to it (it moves with the run), any other local path
absolute (the run may move, the data stays where it is), and a model as a Hub id or an absolute
path (a relative one could not be told from a Hub id).

Pure file logic: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from galaxy_llava.config import read_yaml
from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json
from galaxy_llava.run_layout import MARKER, SETTINGS, TRAINER_STATE, WEIGHTS

# Settings that name a local path (besides the model, a Hub id or a path). Not --deepspeed: its
# value may be a config given inline (base64 JSON) rather than a file.
PATH_SETTINGS = ("data", "feature_cache_dir")
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
    """The prompt stored with a model, adapter, RUN or checkpoint folder (a checkpoint's is its
    run's), or None when none is stored."""
    folder = Path(folder)
    for f in (folder, folder / "model", folder / "adapter"):
        prompt = read_marker(f).get("prompt")
        if prompt:
            return prompt
    run = checkpoint_run(folder)
    if run is not None:
        return read_marker(run).get("prompt") or run_settings(run).get("prompt") or None
    return None


def run_kind(path: str | os.PathLike) -> str | None:
    """'adapter' (a LoRA RUN folder, or an adapter folder itself: ``RUN/adapter``, a LoRA
    checkpoint), 'full' (a full RUN folder), 'model' (a model folder, a full checkpoint) or
    None."""
    path = Path(path)
    if (path / WEIGHTS["adapter"] / "adapter_config.json").is_file():
        return "adapter"
    if (path / WEIGHTS["full"] / "config.json").is_file():
        return "full"
    if (path / "config.json").is_file():
        return "model"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    return None


def weights_folder(path: str | os.PathLike) -> Path:
    """The folder that holds the weights of a :func:`run_kind` folder: ``RUN/adapter``,
    ``RUN/model``, or the folder itself (a model, adapter or checkpoint folder)."""
    path = Path(path)
    kind = run_kind(path)
    if kind == "full" or (kind == "adapter"
                          and (path / WEIGHTS["adapter"] / "adapter_config.json").is_file()):
        return path / WEIGHTS[kind]
    return path


def checkpoint_run(path: str | os.PathLike) -> Path | None:
    """The RUN folder a Trainer checkpoint ``path`` (``trainer_state.json`` inside) lies in, or
    None when ``path`` is not a checkpoint of a galaxy-llava run."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        return None
    run = path.parent
    if (run / SETTINGS).is_file() or read_marker(run).get("kind") == "run":
        return run
    return None


def portable_settings(settings: dict[str, Any], run: str | os.PathLike) -> dict[str, Any]:
    """``settings`` with their paths stored to work from any working directory (see the
    module's docstring): a local model absolute (a Hub id as it is); a path setting inside
    ``run`` relative to it, any other absolute. Relative paths are taken from the working
    directory, as the command that gave them did."""
    out = dict(settings)
    run = Path(run).expanduser().resolve()
    if isinstance(out.get("model_name_or_path"), str):
        out["model_name_or_path"] = abs_if_local(out["model_name_or_path"])
    for key in PATH_SETTINGS:
        if isinstance(out.get(key), str) and out[key]:
            path = Path(out[key]).expanduser().resolve()
            out[key] = str(path.relative_to(run)) if path.is_relative_to(run) else str(path)
    return out


def run_settings(run: str | os.PathLike,
                 relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
    """A run's settings (``RUN/config.yaml``, {} when absent) with its relative paths made
    absolute against the run folder, or ``relative_to`` (the run a ``RUN/.next-run/`` being
    built will become). A run written before paths were stored so keeps a path relative to
    where it was started, which only resolves from there."""
    run = Path(run)
    if not (run / SETTINGS).is_file():
        return {}
    settings = read_yaml(run / SETTINGS)
    base = Path(relative_to if relative_to is not None else run).resolve()
    for key in PATH_SETTINGS:
        value = settings.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            inside = base / value
            if inside.exists() or not Path(value).expanduser().exists():
                settings[key] = str(inside)
    return settings


def adapter_base(run: str | os.PathLike) -> str:
    """The base model of a LoRA run, adapter folder or checkpoint: from our marker (a
    checkpoint's: its run's marker or settings), else from peft's adapter_config.json."""
    run = Path(run)
    adapter = weights_folder(run)
    base = read_marker(run).get("base_model") or read_marker(adapter).get("base_model")
    owner = checkpoint_run(run)
    if not base and owner is not None:
        base = (read_marker(owner).get("base_model")
                or run_settings(owner).get("model_name_or_path"))
    if not base:
        cfg = adapter / "adapter_config.json"
        if cfg.is_file():
            base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter in {run} does not name its base model; "
                        f"add \"base_model\" to {run / MARKER}")
    if is_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(f"the base model of the adapter in {run}, {base}, was not found; "
                        f"set \"base_model\" in {run / MARKER} to its folder or Hub id")
    return base
