"""Whether this run can resume a Trainer checkpoint, known before the run folder changes.

``Trainer.train`` reads a checkpoint's files one at a time, deep inside training: an optimizer
state it cannot unpickle, one for other parameters, or an adapter of another shape fails there,
as an internal error, after the run has started writing. :func:`read_checkpoint` loads every
file the Trainer will load, as it loads them (``weights_only``; memory-mapped, so no tensor is
read), before the data and the model; :func:`check_fits` compares them with the model this run
built, before anything is written. (``training_args.bin`` is a pickle the Trainer never reads
back on resume: ``config.yaml`` holds the settings.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galaxy_llava.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
FULL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin")
# Files the Trainer torch.loads on resume (rng_state_N.pth: one per process).
STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class Checkpoint:
    """What a checkpoint holds: its folder, ``kind`` ("adapter" or "full"), the adapter's
    tensor shapes by name and the optimizer state (memory-mapped), when present."""

    path: Path
    kind: str
    adapter: dict[str, list[int]] = field(default_factory=dict)
    optimizer: dict | None = None


def _refuse(checkpoint: Path, why: str) -> UserError:
    return UserError(f"cannot resume from {checkpoint}: {why}; resume from another checkpoint "
                     "or start over with --overwrite_output_dir")


def _torch_load(path: Path) -> Any:
    """``torch.load`` as the Trainer calls it (weights only, numpy's types allowed), mapped
    rather than read when the file is a zip."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    with open(path, "rb") as f:
        mmap = f.read(4) == _ZIP_MAGIC
    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...: all mean unusable
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise _refuse(path.parent, f"{path.name} cannot be loaded safely "
                                   f"({type(e).__name__}: {detail})") from None


def _kind(checkpoint: Path) -> str:
    if any((checkpoint / f).is_file() for f in ADAPTER_FILES):
        return "adapter"
    if any((checkpoint / f).is_file() for f in FULL_FILES):
        return "full"
    raise _refuse(checkpoint, "it holds no model or adapter weights")


def read_checkpoint(checkpoint: Path, method: str) -> Checkpoint:
    """Check ``checkpoint`` against this run's ``method`` and load what the Trainer will:
    trainer state, optimizer, scheduler, scaler and RNG states. One line on any problem."""
    from safetensors import safe_open
    from transformers import TrainerState

    checkpoint = Path(checkpoint)
    kind = _kind(checkpoint)
    lora = method in ("lora", "qlora")
    if lora and kind == "full":
        raise UserError(f"{checkpoint} holds a full fine-tune, not a LoRA adapter; resume it "
                        "with --method full, or start a new run without --resume_from_checkpoint")
    if not lora and kind == "adapter":
        raise UserError(f"{checkpoint} holds a LoRA adapter, not a full fine-tune; resume it "
                        "with --method lora (or qlora, as it was trained), or start a new run "
                        "without --resume_from_checkpoint")
    try:
        state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    except (OSError, ValueError, TypeError) as e:
        raise _refuse(checkpoint, f"trainer_state.json is not a Trainer state ({e})") from None
    if not isinstance(state.global_step, int):
        raise _refuse(checkpoint, "trainer_state.json has no step count")
    found = Checkpoint(checkpoint, kind)
    for f in sorted(checkpoint.iterdir()):
        if f.name in STATE_FILES or (f.name.startswith("rng_state") and f.suffix == ".pth"):
            loaded = _torch_load(f)
            if not isinstance(loaded, dict):
                raise _refuse(checkpoint, f"{f.name} holds a {type(loaded).__name__}, not a "
                                          "state dict")
            if f.name == "optimizer.pt":
                found.optimizer = loaded
    adapter = checkpoint / "adapter_model.safetensors"
    if kind == "adapter" and adapter.is_file():
        try:
            with safe_open(str(adapter), "pt") as f:
                found.adapter = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # a header safetensors cannot parse
            raise _refuse(checkpoint, f"{adapter.name} is unreadable ({e})") from None
    return found


def _trainer_groups(model, decay: set[str]) -> list[list[tuple[str, Any]]]:
    """The trainable parameters in the Trainer's optimizer groups: weight decay, then none
    (``Trainer.create_optimizer``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[(n, p) for n, p in named if n in decay], [(n, p) for n, p in named if n not in decay]]


def _optimizer_fits(checkpoint: Path, saved: dict, groups: list) -> None:
    try:
        saved_groups = [list(g["params"]) for g in saved["param_groups"]]
        states = saved.get("state", {})
    except (KeyError, TypeError):
        raise _refuse(checkpoint, "optimizer.pt is not an optimizer state") from None
    sizes, wanted = [len(g) for g in saved_groups], [len(g) for g in groups]
    if sizes != wanted:
        raise _refuse(checkpoint, f"its optimizer state has parameter groups of {sizes} "
                                  f"tensors, this run's model trains {wanted}: the checkpoint is "
                                  "of another model or other settings")
    for ids, group in zip(saved_groups, groups):
        for i, (name, param) in zip(ids, group):
            for key, value in (states.get(i) or {}).items():
                shape = list(getattr(value, "shape", ()))
                if shape and shape != list(param.shape):
                    raise _refuse(checkpoint, f"its optimizer's {key} for {name} has shape "
                                              f"{shape}, this run's parameter "
                                              f"{list(param.shape)}")


def check_fits(checkpoint: Checkpoint, model, decay: set[str] | list[str]) -> None:
    """The checkpoint's adapter and optimizer state have this model's trainable tensors, by
    name and shape, in the optimizer groups the Trainer makes (``decay``: the names
    ``Trainer.get_decay_parameter_names`` gives)."""
    if checkpoint.adapter:
        from peft import get_peft_model_state_dict

        ours = {k: list(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        for name, shape in checkpoint.adapter.items():
            if name not in ours:
                raise _refuse(checkpoint.path, f"its adapter holds {name}, which this run's "
                                               "model has no place for (another base model or "
                                               "other LoRA targets)")
            if ours[name] != shape:
                raise _refuse(checkpoint.path, f"its adapter's {name} has shape {shape}, this "
                                               f"run's {ours[name]} (another --lora_r?)")
    if checkpoint.optimizer is not None:
        _optimizer_fits(checkpoint.path, checkpoint.optimizer,
                        _trainer_groups(model, set(decay)))
