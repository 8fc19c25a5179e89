"""Training settings: the :class:`TrainConfig` dataclass (the one source of truth), YAML loading and
``KEY=VALUE`` overrides. Precedence: dataclass defaults < YAML file < CLI flags < ``--set``.

Method defaults follow the reference recipe (full: lr 1e-5, batch 1; LoRA: lr 5e-5, batch 8;
3 epochs); ``batch_size``/``lr`` left at None take the method's default when resolved.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from galaxy_llava.errors import UserError
from galaxy_llava.modeling import DEFAULT_MODEL, DEFAULT_PROMPT

METHODS = ("full", "lora")
METHOD_DEFAULTS = {"full": {"lr": 1e-5, "batch_size": 1}, "lora": {"lr": 5e-5, "batch_size": 8}}
CHOICES = {
    "method": METHODS,
    "precision": ("auto", "fp32", "bf16"),
    "lora_projector": ("lora", "full"),
    "feature_cache": ("memory", "disk", "off"),
    "lr_scheduler": ("linear", "cosine", "constant"),
}


@dataclass
class TrainConfig:
    """Every setting of a training run; saved resolved as ``RUN/config.yaml``."""

    model: str = DEFAULT_MODEL
    data: str | None = None
    method: str | None = None
    out: str | None = None
    epochs: float = 3
    batch_size: int | None = None          # None -> method default (full 1, lora 8)
    lr: float | None = None                # None -> method default (full 1e-5, lora 5e-5)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_projector: str = "lora"           # projector: LoRA-adapted, or "full" (trained whole)
    max_steps: int | None = None           # optimizer steps; caps epochs
    seed: int = 42
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"           # HF Trainer's default: linear decay to 0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"                # auto: bf16 autocast on a capable GPU, fp32 elsewhere
    tf32: bool = True
    compile: bool = False
    gradient_checkpointing: bool = False
    feature_cache: str = "memory"          # frozen vision tower: its features once per image
    feature_cache_dir: str | None = None   # disk cache folder; None -> RUN/cache
    feature_batch_size: int = 32
    label_only_loss: bool = True           # lm_head only where a label is (exact, less memory)
    eval_batch_size: int | None = None     # None -> batch_size
    num_workers: int = 0
    log_every: int = 10
    keep_checkpoints: int = 1              # newest N epoch checkpoints kept; 0 = none written
    overwrite: bool = False                # start over in a RUN folder that holds a run
    device: str | None = None              # None: cuda when available, else cpu
    prompt: str = DEFAULT_PROMPT

    def resolved(self) -> "TrainConfig":
        """A copy with method defaults filled in and every value checked (UserError if bad)."""
        cfg = dataclasses.replace(self)
        if cfg.method is None:
            raise UserError("no training method given: use --method full or --method lora")
        for key, allowed in CHOICES.items():
            if getattr(cfg, key) not in allowed:
                raise UserError(f"unknown {key} {getattr(cfg, key)!r}; expected one of "
                                f"{', '.join(allowed)}")
        defaults = METHOD_DEFAULTS[cfg.method]
        cfg.lr = defaults["lr"] if cfg.lr is None else cfg.lr
        cfg.batch_size = defaults["batch_size"] if cfg.batch_size is None else cfg.batch_size
        checks = {
            "epochs": cfg.epochs > 0, "batch_size": cfg.batch_size >= 1, "lr": cfg.lr > 0,
            "grad_accum": cfg.grad_accum >= 1, "lora_r": cfg.lora_r >= 1,
            "lora_dropout": 0 <= cfg.lora_dropout < 1, "warmup_ratio": 0 <= cfg.warmup_ratio <= 1,
            "max_steps": cfg.max_steps is None or cfg.max_steps >= 1,
            "log_every": cfg.log_every >= 1, "keep_checkpoints": cfg.keep_checkpoints >= 0,
            "feature_batch_size": cfg.feature_batch_size >= 1, "num_workers": cfg.num_workers >= 0,
            "eval_batch_size": cfg.eval_batch_size is None or cfg.eval_batch_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"invalid value for {bad[0]}: {getattr(cfg, bad[0])!r}")
        if "<image>" not in cfg.prompt:
            raise UserError("the prompt must contain the <image> placeholder")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-safe) of every field."""
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats, paths for strings."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} cannot be empty (null)")
    if isinstance(value, os.PathLike) and base is str:
        return str(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if base is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise UserError(f"{key} expects {base.__name__}, got {value!r}")
    return value


def _check_keys(keys, source: str) -> None:
    unknown = [k for k in keys if k not in FIELDS]
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r} in {source}; valid keys: "
                        f"{', '.join(FIELDS)}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "overrides"
                    ) -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied (keys may use dashes); None (YAML ``null``)
    sets a setting that may be empty, such as ``max_grad_norm: null`` (no clipping)."""
    clean = {str(k).replace("-", "_"): v for k, v in overrides.items()}
    _check_keys(clean, source)
    return dataclasses.replace(cfg, **{k: _coerce(k, v) for k, v in clean.items()})


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping of settings (UserError if missing, unparsable, not a mapping or unknown keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of settings (key: value)")
    _check_keys([str(k).replace("-", "_") for k in data], str(path))
    return data


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-4", "compile=true"]`` -> ``{"lr": 1e-4, "compile": True}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        _check_keys([key], "--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def load_config(yaml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or ``base``), then the YAML file, then ``overrides``; unresolved (see ``resolved``)."""
    cfg = base if base is not None else TrainConfig()
    if yaml_path is not None:
        cfg = apply_overrides(cfg, read_yaml(yaml_path), source=str(yaml_path))
    return apply_overrides(cfg, overrides or {}, source="--set / command-line flags")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the config as YAML (atomically), readable back with :func:`load_config`."""
    from galaxy_llava.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
