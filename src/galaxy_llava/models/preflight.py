"""A model folder's health before it loads, without torch: its config readable, its model type
one galaxy-llava supports, its weights whole, and the generation settings within what its
context leaves.

The checks run before a model is loaded (by describe, evaluate, probe, the catalogue, the web
app, export and training), so a damaged folder or a too-long ``--max-new-tokens`` costs a second,
not a model load; every problem is a one-line :class:`~galaxy_llava.errors.UserError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from galaxy_llava.checks import check_weights, number
from galaxy_llava.errors import UserError
from galaxy_llava.models.folders import adapter_base, is_local, run_kind, weights_folder
from galaxy_llava.models.registry import FAMILIES

DEFAULT_CONTEXT = 4096  # generation ceiling when a model does not state its context


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict; one line when it is not JSON."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON model config ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def preflight_model(model: str | os.PathLike) -> dict | None:
    """Cheap checks of a local run or model folder before it is loaded: ``config.json`` readable,
    its ``model_type`` one galaxy-llava supports, weights whole (an adapter's base too).

    Returns the model's config as a dict, or None for a Hub id or a path the loader will
    report on itself."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    kind = run_kind(path)
    if kind == "adapter":
        check_weights(weights_folder(path))
        base = adapter_base(path)
        return preflight_model(base) if is_local(base) else None
    if kind is None:
        return None
    folder = weights_folder(path)
    config = read_config(folder)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"unsupported model type {model_type!r} in {folder / 'config.json'}; "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    check_weights(folder)
    return config


def generation_ceiling(config: dict) -> tuple[int, int]:
    """(new tokens a model can generate after its image and prompt, its context length)."""
    text = config.get("text_config") or {}
    context = (text.get("max_position_embeddings") or config.get("max_position_embeddings")
               or DEFAULT_CONTEXT)
    image_tokens = int(config.get("image_seq_length") or 0)
    return max(1, int(context) - image_tokens - 1), int(context)


def check_generation(model: str | os.PathLike, batch_size: int, num_beams: int,
                     max_new_tokens: int) -> None:
    """Generation settings in range before the model loads: each at least 1, and
    ``max_new_tokens`` within what the model's context leaves after the image."""
    for flag, value in (("--batch-size", batch_size), ("--num-beams", num_beams),
                        ("--max-new-tokens", max_new_tokens)):
        number(flag, value, 1, integer=True)
    config = preflight_model(model)
    if config is None:
        if is_local(str(model)):
            return  # missing or not a model folder: the loader says which, in one line
        from galaxy_llava.models.loading import load_config  # torch: only for a Hub id

        config = load_config(str(model)).to_dict()
    ceiling, context = generation_ceiling(config)
    if max_new_tokens > ceiling:
        raise UserError(f"--max-new-tokens {max_new_tokens} is more than {model} can generate: "
                        f"its context is {context} tokens, so at most {ceiling} new ones")
