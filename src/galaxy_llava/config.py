"""galaxy-llava's own training settings and their defaults; no torch, no transformers.

``galaxy-llava train`` takes these *and* every ``transformers.TrainingArguments`` field, by their
Hugging Face names (``--learning_rate``, ``--num_train_epochs``, ``--per_device_train_batch_size``,
...), as flags or as keys of a YAML config; the parser that joins them is in
:mod:`galaxy_llava.training.arguments`. Precedence: defaults < method defaults < the run's saved
``config.yaml`` (on resume) < ``--config`` YAML < command-line flags. ``--config`` takes a YAML
file's path or the name of a config shipped in the package (``galaxy_llava/configs/``: ``lora``,
``full``, ``demo-lora``, ``demo-full``), so an installed package finds them from any folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from galaxy_llava.errors import UserError

DEFAULT_MODEL = "bczhou/tiny-llava-v1-hf"
# What the user turn asks: every family's default prompt and the prepared dataset's TRL messages.
DEFAULT_QUESTION = "Describe this galaxy."
DEFAULT_PROMPT = f"USER: <image>\n{DEFAULT_QUESTION}\nASSISTANT:"  # TinyLLaVA's (LLaVA's) format
# Hub tags of what galaxy-llava writes: model cards and prepared datasets' cards.
TAGS = ("galaxy-llava", "galaxy-zoo", "astronomy", "galaxy-morphology", "image-captioning")
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Decoding:
    """How galaxy-llava describes images, everywhere: ``describe``, ``evaluate``, ``catalogue``,
    ``serve`` and the ``generation_config.json`` of every saved model (beam search, greedy
    within it, no sampling; a batch of images per ``generate`` call). The one home of these
    defaults: functions take ``DECODING.num_beams`` and the CLI's flags show it."""

    num_beams: int = 3
    max_new_tokens: int = 40
    batch_size: int = 16
    do_sample: bool = False


DECODING = Decoding()
CAPTION_TARGETS = ("caption", "votes")
# torch's CPU threads when neither --threads nor OMP_NUM_THREADS says otherwise. Measured with
# benchmarks/threads.py (BENCHMARKS.md, "CPU threads"): on the shared 2-core machine one thread
# beat torch's default (one per core) on every workload, whole commands timed: pretraining the
# tiny model 5.8x, LoRA training 2.3x (tiny) and 1.4x (mini preset).
DEFAULT_THREADS = 1

# The reference recipe per method (the notebook's): full lr 1e-5 batch 1; LoRA lr 5e-5 batch 8.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"learning_rate": 1e-5, "per_device_train_batch_size": 1},
    "lora": {"learning_rate": 5e-5, "per_device_train_batch_size": 8},
    "qlora": {"learning_rate": 5e-5, "per_device_train_batch_size": 8},
}
# TrainingArguments defaults this project changes, and why.
TRAINING_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,               # the reference recipe
    "optim": "adamw_torch_fused",        # one kernel launch per step (also on the CPU)
    "logging_steps": 10,
    "save_strategy": "epoch",            # resumable at every epoch
    "save_total_limit": 1,               # a full TinyLLaVA checkpoint is ~17 GB with AdamW state
    "eval_strategy": "epoch",            # validation loss, when the data has that split
    "prediction_loss_only": True,        # evaluation needs the loss, not gathered logits
    "remove_unused_columns": False,      # batches carry label masks the model signature lacks
    "label_names": ["labels"],
    "report_to": "none",
    # The Trainer's bar (its ETA) and its logged loss; left unset, transformers hides them when
    # its log level is above warnings, as the CLI sets it to silence the libraries' noise.
    "disable_tqdm": False,
    "ddp_find_unused_parameters": False,  # every trainable parameter is used at every step
    "activation_checkpointing_kwargs": {"use_reentrant": False},  # frozen inputs still get grads
    "seed": 42,
}


# The CLI's global flags (any command, before or after it; galaxy_llava.cli applies them):
# flag -> argparse keywords.
GLOBAL_FLAGS: dict[str, dict[str, Any]] = {
    "--threads": {"type": int, "default": None, "metavar": "N", "help": (
        f"CPU threads for torch (default: {DEFAULT_THREADS}, measured fastest for these models "
        "on a shared CPU, see BENCHMARKS.md; 0: torch's own choice, one per core; without "
        "--threads an OMP_NUM_THREADS setting is kept)")},
    "--verbose": {"action": "store_true", "help": (
        "show the libraries' own progress bars and warnings (transformers' 'Loading weights' "
        "bar of every model load); galaxy-llava's own progress bars show either way")},
    "--debug": {"action": "store_true", "help": "show the traceback of an unexpected error"},
}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class FinetuneArguments:
    """What to train and how (besides the Trainer's own settings)."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata=_help(
        "base model: Hub id, model folder or RUN folder", aliases=["--model"]))
    data: str | None = field(default=None, metadata=_help(
        "prepared data folder (galaxy-llava prepare): trains on its train split, validates on "
        "its validation split"))
    method: str | None = field(default=None, metadata=_help(
        "full (vision tower frozen) | lora | qlora (4-bit base, CUDA only)"))
    lora_r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=16, metadata=_help("LoRA alpha (scaling alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    lora_target_modules: str | None = field(default=None, metadata=_help(
        "peft target_modules regex; default: the family's language-model linears + projector"))
    lora_projector: str = field(default="lora", metadata=_help(
        "projector under LoRA: lora (adapted) | full (trained whole, peft modules_to_save)"))
    feature_cache: str = field(default="memory", metadata=_help(
        "frozen vision encoder run once per image: memory | disk | off"))
    feature_cache_dir: str | None = field(default=None, metadata=_help(
        "folder of the disk feature cache (default OUTPUT_DIR/cache)"))
    feature_batch_size: int = field(default=32, metadata=_help("images per encoder batch"))
    label_only_loss: bool = field(default=True, metadata=_help(
        "apply lm_head only where a label is (exact; no [batch, length, vocab] logits)"))
    caption_targets: str = field(default="caption", metadata=_help(
        "what each galaxy teaches: caption (its one caption, by the rule set's thresholds) | "
        "votes (each time it is seen, a caption drawn from its volunteers' vote fractions, so "
        "the model's probabilities learn to match the votes; needs a prepared dataset)"))
    prompt: str | None = field(default=None, metadata=_help(
        "training prompt with one image placeholder; default: the model family's"))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "allow code shipped with the checkpoint (off: safe by default)"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "start over in an OUTPUT_DIR that already holds a run"))
    allow_outside_paths: bool = field(default=False, metadata=_help(
        "read dataset images outside the data folder (refused by default)",
        aliases=["--allow-outside-paths"]))

    def check(self) -> "FinetuneArguments":
        """Raise a one-line UserError for a value out of range; return self."""
        choices = {"method": METHODS, "lora_projector": ("lora", "full"),
                   "feature_cache": ("memory", "disk", "off"),
                   "caption_targets": CAPTION_TARGETS}
        if self.method is None:
            raise UserError("no training method given: use --method full, lora or qlora")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"unknown {key} {getattr(self, key)!r}; expected one of "
                                f"{', '.join(allowed)}")
        checks = {"lora_r": self.lora_r >= 1, "lora_alpha": self.lora_alpha > 0,
                  "lora_dropout": 0 <= self.lora_dropout < 1,
                  "feature_batch_size": self.feature_batch_size >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"invalid value for {bad[0]}: {getattr(self, bad[0])!r}")
        if self.data is None:
            raise UserError("no data given: pass --data FOLDER (a prepared dataset)")
        return self


def shipped_configs() -> dict[str, Path]:
    """The YAML configs that ship inside the package, by name (the file name without .yaml)."""
    folder = resources.files("galaxy_llava") / "configs"
    return {f.name[:-len(".yaml")]: Path(str(f))
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A ``--config`` value as a file: an existing file as given (it wins over a shipped name),
    else the shipped config of that name (``demo-lora`` or ``demo-lora.yaml``); otherwise a
    one-line UserError that lists the shipped names, so an installed package needs no clone."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    names = ", ".join(sorted(shipped))
    what = "config file" if path.parent != Path(".") or path.suffix else "config"
    raise UserError(f"{what} {str(name_or_path)!r} not found: give a YAML file or the name of a "
                    f"shipped config: {names}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping of settings (UserError if missing, unparsable or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of settings (key: value)")
    return {str(k).replace("-", "_"): _number(v) for k, v in data.items()}


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; read it as the number it is."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value) else value
