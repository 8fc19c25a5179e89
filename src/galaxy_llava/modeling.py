"""Load, adapt, save and export LLaVA models (TinyLLaVA by default); store the prompt with them.

Random-initialised tiny models for tests and the demo are built by :mod:`galaxy_llava.tiny`.

Folders this module writes or reads:

* a *model folder*: a plain Hugging Face LLaVA checkpoint (``config.json``, ``model.safetensors``,
  processor files) plus ``galaxy_llava.json`` = ``{"kind": "model", "prompt", "base_model"}``;
* a *RUN folder* (written by the trainer through :func:`save_run_model`): ``RUN/model/`` (full
  fine-tune, a model folder) or ``RUN/adapter/`` (peft LoRA adapter with the processor beside it and
  ``galaxy_llava.json`` kind ``"adapter"``), and ``RUN/galaxy_llava.json`` kind ``"run"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, write_json

DEFAULT_MODEL = "bczhou/tiny-llava-v1-hf"
DEFAULT_PROMPT = "USER: <image>\nDescribe this galaxy.\nASSISTANT:"
MARKER = "galaxy_llava.json"
# LoRA targets: the decoder's attention and MLP projections and the projector's two linears. A
# regex (peft full-matches it against module names) so the CLIP tower's q/k/v_proj never match.
LANGUAGE_TARGET_REGEX = (r".*language_model\.layers\.\d+\."
                         r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
LORA_TARGET_REGEX = LANGUAGE_TARGET_REGEX + r"|.*multi_modal_projector\.linear_[12]"

# ----------------------------------------------------------------- prompt / marker storage


def _read_marker(folder: Path) -> dict:
    path = Path(folder) / MARKER
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    return data if isinstance(data, dict) else {}


def _write_marker(folder: Path, **fields: Any) -> None:
    data = {**_read_marker(folder), **{k: v for k, v in fields.items() if v is not None}}
    write_json(Path(folder) / MARKER, data)


def write_prompt(folder: str | os.PathLike, prompt: str, kind: str | None = None,
                 base_model: str | None = None) -> None:
    """Store the prompt a model was trained with in ``folder/galaxy_llava.json``, by the model."""
    _write_marker(Path(folder), prompt=prompt, kind=kind, base_model=base_model)


def read_prompt(folder: str | os.PathLike) -> str | None:
    """The prompt stored with a model, adapter or RUN folder, or None when none is stored."""
    folder = Path(folder)
    for f in (folder, folder / "model", folder / "adapter"):
        prompt = _read_marker(f).get("prompt")
        if prompt:
            return prompt
    return None


# ----------------------------------------------------------------- device and dtype


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


# ----------------------------------------------------------------- loading


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_local(name: str) -> bool:
    """A path (existing, or not shaped like a Hub id ``org/name``) rather than a Hub id."""
    return Path(name).expanduser().exists() or not _HUB_ID.match(name)


def _hub_error(name: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    why = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "it could not be fetched"
    return UserError(f"no local folder {name!r}, and cannot load it from the Hugging Face Hub: "
                     f"{why} or the id is unknown "
                     f"({first[:160]}); download it once with `hf download {name} --local-dir DIR` "
                     f"and pass --model DIR (a local folder)")


def _load_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if _is_local(name):
        if not path.is_dir():
            raise UserError(f"model folder {name} does not exist")
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is not a galaxy-llava run or LLaVA model (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path) if _is_local(name) else name,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if _is_local(name):
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot read the model config in {name}: {first}") from None
        raise _hub_error(name, e) from None


def fix_processor(processor, config) -> None:
    """Make the processor expand ``<image>`` to as many tokens as the model has image features.

    TinyLLaVA's processor ships without ``patch_size`` (the notebook set it by hand); take it from
    the vision config, and the CLS/strategy accounting from the model config."""
    from galaxy_llava.data import num_image_tokens
    from galaxy_llava.features import num_image_tokens as model_image_tokens

    vc = config.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    expected = model_image_tokens(config)
    if num_image_tokens(processor) != expected:
        processor.num_additional_image_tokens = 1
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if num_image_tokens(processor) != expected:
        raise UserError(f"the processor gives {num_image_tokens(processor)} image tokens per image "
                        f"but the model expects {expected}; check the image processor's crop size")


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None,
               trust_remote_code: bool = False):
    """Load a LLaVA model and processor (Hub id or local folder), safetensors only, on ``device``.

    Returns ``(model, processor)``; bf16 on a capable GPU, fp32 on CPU, SDPA attention. A RUN
    folder works too (its ``model/``, or its LoRA adapter merged into the base weights)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    name = str(name_or_path)
    run_kind = _run_kind(Path(name).expanduser()) if Path(name).expanduser().is_dir() else None
    if run_kind == "adapter":
        return _load_adapter_model(Path(name).expanduser(), device=device, dtype=dtype)
    if run_kind == "full":
        name = str(Path(name) / "model")
    config = _load_config(name, trust_remote_code)
    if config.model_type != "llava":
        raise UserError(f"{name} is a {config.model_type!r} checkpoint, not a LLaVA model "
                        f"(LlavaForConditionalGeneration); pass a LLaVA model such as "
                        f"{DEFAULT_MODEL}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = str(Path(name).expanduser()) if _is_local(name) else name
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                  trust_remote_code=trust_remote_code)
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _is_local(name):
            if not list(Path(source).glob("*.safetensors")):
                raise UserError(f"{name} has no .safetensors weights (pickle .bin files are not "
                                "loaded for safety); convert it to safetensors first") from None
            raise UserError(f"cannot load the LLaVA model in {name}: {msg[:200]}") from None
        raise _hub_error(name, e) from None
    fix_processor(processor, model.config)
    return model, processor


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 calls a transformers API deprecated in 5.x; its FutureWarning is noise to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield


def _adapter_base(run: Path) -> str:
    """The base model of a LoRA run: from our marker, else from peft's adapter_config.json."""
    base = _read_marker(run).get("base_model") or _read_marker(run / "adapter").get("base_model")
    if not base:
        cfg = run / "adapter" / "adapter_config.json"
        if cfg.is_file():
            base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter in {run} does not name its base model; "
                        f"add \"base_model\" to {run / MARKER}")
    if _is_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(f"the base model of the adapter in {run}, {base}, was not found; "
                        f"set \"base_model\" in {run / MARKER} to its folder or Hub id")
    return base


def _run_kind(path: Path) -> str | None:
    """'adapter', 'full' (RUN folders), 'model' (a plain checkpoint folder) or None."""
    if (path / "adapter" / "adapter_config.json").is_file():
        return "adapter"
    if (path / "model" / "config.json").is_file():
        return "full"
    if (path / "config.json").is_file():
        return "model"
    return None


def _load_adapter_model(run: Path, device=None, dtype=None, merge: bool = True):
    from peft import PeftModel
    from transformers import AutoProcessor

    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin: weights load as safetensors only.
        raise UserError(f"{run / 'adapter'} has no adapter_model.safetensors")
    base_name = _adapter_base(run)
    model, processor = load_model(base_name, device=device, dtype=dtype)
    with _quiet_peft():
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
    if (run / "adapter" / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(run / "adapter"))
        fix_processor(processor, model.config)
    return (model.merge_and_unload() if merge else model), processor


def load_for_inference(run_or_model: str | os.PathLike, device=None):
    """Load a RUN folder (``model/`` or LoRA ``adapter/``), model folder or Hub id for inference.

    Returns ``(model, processor, prompt)`` with the model in eval mode and LoRA merged; the prompt
    is the one stored with the model, else DEFAULT_PROMPT with a warning."""
    name = str(run_or_model)
    path = Path(name).expanduser()
    if path.is_dir():
        kind = _run_kind(path)
        if kind is None:
            raise UserError(f"{name} is not a galaxy-llava run or LLaVA model "
                            "(no adapter/, model/ or config.json inside)")
        if kind == "adapter":
            model, processor = _load_adapter_model(path, device=device)
        else:
            model, processor = load_model(path / "model" if kind == "full" else path, device=device)
        prompt = read_prompt(path)
    elif _is_local(name):
        raise UserError(f"{name} does not exist (expected a run folder, model folder or Hub id)")
    else:
        model, processor = load_model(name, device=device)
        prompt = None
    if prompt is None:
        warnings.warn(f"no prompt stored with {name}; using the default {DEFAULT_PROMPT!r}",
                      stacklevel=2)
        prompt = DEFAULT_PROMPT
    return model.eval(), processor, prompt


# ----------------------------------------------------------------- training helpers


def _vision_tower(model):
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            return module
    raise UserError("the model has no vision_tower; is it a LLaVA model?")


def freeze_vision_tower(model) -> None:
    """Stop gradients into the CLIP tower: 1.8k galaxies would only erode its general features."""
    for p in _vision_tower(model).parameters():
        p.requires_grad_(False)


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, projector: str = "lora"):
    """Wrap ``model`` in peft LoRA on the language model's q/k/v/o/gate/up/down and the projector.

    The projector is LoRA-adapted by default (``projector="lora"``), not trained whole: the caption
    grammar carries ~20 attribute values, a low-rank change of what reaches the decoder, and a
    rank-r update of the pretrained 6.3 M-parameter MLP cannot wreck it at LoRA learning rates on
    1.8k images, while the adapter stays small. ``projector="full"`` trains it whole
    (peft ``modules_to_save``) for a randomly initialised or badly mismatched projector. The
    reference's ``mm_projector`` target matched nothing (defect 1); the vision tower stays
    untouched."""
    from peft import LoraConfig, get_peft_model

    if projector not in ("lora", "full"):
        raise UserError(f"projector must be 'lora' or 'full', not {projector!r}")
    target = LORA_TARGET_REGEX if projector == "lora" else LANGUAGE_TARGET_REGEX
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target,
        modules_to_save=["multi_modal_projector"] if projector == "full" else None)
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    freeze_vision_tower(peft_model)
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _abs_if_local(name: str | None) -> str | None:
    if name and _is_local(name) and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def save_run_model(model, processor, run: str | os.PathLike, prompt: str = DEFAULT_PROMPT,
                   base_model: str | None = None) -> Path:
    """Save a trained model into a RUN folder: ``RUN/adapter/`` for a peft model, else
    ``RUN/model/``.

    The processor goes beside the weights; the prompt, base model and kind go in galaxy_llava.json
    files, so :func:`load_for_inference` and :func:`export_run` need nothing else. Returns the
    weights folder."""
    from peft import PeftModel

    run = Path(run)
    base_model = _abs_if_local(base_model or getattr(model, "name_or_path", None))
    is_adapter = isinstance(model, PeftModel)
    folder = run / ("adapter" if is_adapter else "model")
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_prompt(tmp, prompt, kind="adapter" if is_adapter else "model", base_model=base_model)
    # Only one kind of weights per run: a stale folder of the other kind would shadow this one.
    shutil.rmtree(run / ("model" if is_adapter else "adapter"), ignore_errors=True)
    _write_marker(run, kind="run", prompt=prompt, base_model=base_model,
                  method="lora" if is_adapter else "full")
    return folder


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a RUN as a plain LLaVA checkpoint (LoRA merged into the base weights), with its
    processor and prompt; returns ``out``."""
    run, out = Path(run), Path(out)
    kind = _run_kind(run) if run.is_dir() else None
    if kind not in ("adapter", "full"):
        raise UserError(f"{run} is not a galaxy-llava run (no adapter/ or model/ folder inside)")
    prompt = read_prompt(run) or DEFAULT_PROMPT
    with atomic_path(out) as tmp:
        if kind == "full":
            shutil.copytree(run / "model", tmp)
            base = _read_marker(run).get("base_model")
        else:
            base = _adapter_base(run)
            # Merge in fp32 on the CPU (exact), then store in the base checkpoint's dtype.
            saved = getattr(_load_config(base, False), "dtype", None)
            model, processor = _load_adapter_model(run, device="cpu", dtype=torch.float32)
            if isinstance(saved, str):
                saved = getattr(torch, saved, None)
            if isinstance(saved, torch.dtype) and saved != torch.float32:
                model = model.to(saved)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        write_prompt(tmp, prompt, kind="model", base_model=base)
    return out
