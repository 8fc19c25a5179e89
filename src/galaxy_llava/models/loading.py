"""Load a model and its processor (Hub id, model folder or RUN folder) safely: safetensors only,
``trust_remote_code`` off unless asked, one-line errors for what a user can fix (offline Hub,
missing folder, pickle-only weights, unsupported model type)."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path

import torch

from galaxy_llava.config import DEFAULT_MODEL
from galaxy_llava.errors import UserError
from galaxy_llava.models.registry import FAMILIES, family_for
from galaxy_llava.models.folders import (adapter_base, is_local, read_prompt, run_kind,
                                         weights_folder)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: as given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it (over 10x the fp32 throughput, defect 9), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        named = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in named:
            raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(named)}")
        return named[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def hub_error(name: str, e: Exception) -> UserError:
    """The one-line error for a Hub id that cannot be fetched (offline, or unknown)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "it could not be fetched"
    return UserError(f"no local folder {name!r}, and cannot load it from the Hugging Face Hub: "
                     f"{why} or the id is unknown ({first[:160]}); download it once with "
                     f"`hf download {name} --local-dir DIR` and pass the folder instead")


def load_config(name: str, trust_remote_code: bool = False):
    """The model's ``AutoConfig`` (local folder or Hub id)."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if is_local(name):
        if not path.is_dir():
            raise UserError(f"model folder {name} does not exist")
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a galaxy-llava run or model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if is_local(name) else name,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        unknown = re.search(r"model type `([^`]*)` but Transformers does not recognize", str(e))
        if unknown:  # a checkpoint of a type transformers lacks (tiny_llava): not a Hub problem
            raise UserError(f"unsupported model type {unknown.group(1)!r} in {name} (this "
                            f"transformers does not know it); supported: "
                            f"{', '.join(sorted(FAMILIES))}") from None
        if is_local(name):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot read the model config in {name}: {first}") from None
        raise hub_error(name, e) from None


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None,
               trust_remote_code: bool = False, quantization_config=None):
    """Load a model and processor (Hub id or local folder), safetensors only, on ``device``.

    Returns ``(model, processor)``; bf16 on a capable GPU, fp32 on CPU, SDPA attention. A RUN
    folder works too (its ``model/``, or its LoRA adapter merged into the base weights)."""
    from transformers import AutoModelForImageTextToText

    name = str(name_or_path)
    kind = run_kind(Path(name).expanduser()) if Path(name).expanduser().is_dir() else None
    if kind == "adapter":
        return load_adapter_model(Path(name).expanduser(), device=device, dtype=dtype)
    if kind == "full":
        name = str(Path(name) / "model")
    config = load_config(name, trust_remote_code)
    family = family_for(config)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    # A local folder by its absolute path: the model's name_or_path, and so the base that peft
    # records in a LoRA adapter's adapter_config.json, then works from any working directory.
    source = str(Path(name).expanduser().resolve()) if is_local(name) else name
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                  trust_remote_code=trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        processor = family.load_processor(source, trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_local(name):
            if not list(Path(source).glob("*.safetensors")):
                raise UserError(f"{name} has no .safetensors weights (pickle .bin files are not "
                                "loaded for safety); convert it to safetensors first") from None
            raise UserError(f"cannot load the model in {name}: {msg[:200]}") from None
        raise hub_error(name, e) from None
    family.fix_processor(processor, model.config)
    return model, processor


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 calls a transformers API deprecated in 5.x; its FutureWarning is noise to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield


def load_adapter_model(run: Path, device=None, dtype=None, merge: bool = True):
    """A LoRA RUN folder's (or adapter folder's, or LoRA checkpoint's) base model with its
    adapter (merged unless ``merge=False``)."""
    from peft import PeftModel

    adapter = weights_folder(run)
    if not (adapter / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin: weights load as safetensors only.
        raise UserError(f"{adapter} has no adapter_model.safetensors")
    model, processor = load_model(adapter_base(run), device=device, dtype=dtype)
    with quiet_peft():
        model = PeftModel.from_pretrained(model, str(adapter))
    if (adapter / "processor_config.json").is_file():
        family = family_for(model)
        processor = family.load_processor(str(adapter))
        family.fix_processor(processor, model.config)
    return (model.merge_and_unload() if merge else model), processor


def load_for_inference(run_or_model: str | os.PathLike, device=None):
    """Load a RUN folder (``model/`` or LoRA ``adapter/``), a run's ``checkpoint-N`` (full or
    LoRA), model folder or Hub id for inference.

    Returns ``(model, processor, prompt)`` with the model in eval mode and LoRA merged; the prompt
    is the one stored with the model, else the family's default with a warning."""
    name = str(run_or_model)
    path = Path(name).expanduser()
    if path.is_dir():
        kind = run_kind(path)
        if kind is None:
            raise UserError(f"{name} is not a galaxy-llava run or model folder "
                            "(no adapter/, model/, config.json or adapter_config.json inside)")
        if kind == "adapter":
            model, processor = load_adapter_model(path, device=device)
        else:
            model, processor = load_model(path / "model" if kind == "full" else path, device=device)
        prompt = read_prompt(path)
    elif is_local(name):
        raise UserError(f"{name} does not exist (expected a run folder, model folder or Hub id)")
    else:
        model, processor = load_model(name, device=device)
        prompt = None
    if prompt is None:
        prompt = family_for(model).default_prompt(processor)
        warnings.warn(f"no prompt stored with {name}; using the default {prompt!r}", stacklevel=2)
    return model.eval(), processor, prompt
