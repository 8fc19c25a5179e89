"""``galaxy-llava train``'s arguments: :class:`~galaxy_llava.config.FinetuneArguments` plus every
``transformers.TrainingArguments`` field, parsed with ``HfArgumentParser`` from flags, a YAML
config and a resumed run's saved ``config.yaml``, in that order of precedence (flags win)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from galaxy_llava import __version__
from galaxy_llava import config as config_module  # its source is part of the help cache's key
from galaxy_llava.checks import number, seed
from galaxy_llava.config import (GLOBAL_FLAGS, METHOD_DEFAULTS, TRAINING_DEFAULTS,
                                 FinetuneArguments, find_config, read_yaml, shipped_configs)
from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object, write_json
from galaxy_llava.models.folders import SETTINGS as CONFIG_FILE
from galaxy_llava.models.folders import portable_settings, run_settings
from galaxy_llava.outputs import check_kind
from galaxy_llava.training import run_folder

DESCRIPTION = ("Fine-tune a vision-language model on a prepared galaxy dataset with the Hugging "
               "Face Trainer. Every TrainingArguments name works as a flag and as a key of the "
               "--config YAML; per_device_train_batch_size is per process (the effective batch, "
               "per device x gradient_accumulation_steps x processes, is printed at start). "
               "Defaults shown are galaxy-llava's; --method also sets " + "; ".join(
                   f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                   for m, d in METHOD_DEFAULTS.items())
               + "; on a GPU, bf16 (where supported) and tf32.")
# TrainingArguments' own --debug (underflow_overflow, tpu_metrics_debug) yields the flag to
# galaxy-llava's; it stays a key of the --config YAML.
DEBUG_HELP = ("show the traceback of an unexpected error (TrainingArguments' own debug modes, "
              "such as underflow_overflow: the debug: key of a --config YAML)")


def build_parser():
    """The ``HfArgumentParser`` of (FinetuneArguments, TrainingArguments) plus ``--config``."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), prog="galaxy-llava train",
                              description=DESCRIPTION)
    parser.add_argument("--config", default=None, metavar="YAML|NAME",
                        help="YAML (or JSON) file of settings by the names above, or the name "
                             "of a config shipped with galaxy-llava: "
                             f"{', '.join(shipped_configs())}")
    # The CLI's global flags, taken out before this parser runs (galaxy_llava.cli); listed here
    # so that `galaxy-llava train --help` shows them. TrainingArguments' --debug never sees the
    # command line (the CLI takes --debug first): its help says both.
    for flag, kwargs in GLOBAL_FLAGS.items():
        if flag != "--debug":
            parser.add_argument(flag, **kwargs)
    for action in parser._actions:
        if action.dest == "debug":  # shown as the switch the command line has
            action.help, action.nargs = DEBUG_HELP, 0
    parser.set_defaults(**_argparse_ready(TRAINING_DEFAULTS))  # so --help shows ours
    return parser


_NOT_SETTINGS = {"help", "config", "threads", "verbose"}


def _names(parser) -> dict[str, str]:
    """Every name a setting goes by, as a key: its field and each of its flags without the
    dashes (``model`` -> ``model_name_or_path``), so a YAML file says what a flag says."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if action.dest in _NOT_SETTINGS or (action.nargs == 0 and action.const is False):
            continue  # not a setting, or a --no_X switch (its name would invert the value)
        names[action.dest] = action.dest
        for flag in action.option_strings:
            if flag.startswith("--"):
                names.setdefault(flag[2:].replace("-", "_"), action.dest)
    return names


def _by_field(settings: dict[str, Any], parser, source: str) -> dict[str, Any]:
    """``settings`` keyed by field name (aliases resolved); an unknown name, or two names of
    one field, is a one-line UserError."""
    names, out, given = _names(parser), {}, {}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r} in {source}; see `galaxy-llava train "
                        "--help` for the valid names (TrainingArguments' and galaxy-llava's)")
    for key, value in settings.items():
        field = names[key]
        if field in out:
            raise UserError(f"{given[field]!r} and {key!r} in {source} are the same setting; "
                            "give one")
        out[field], given[field] = value, key
    return out


def saved_settings(output_dir: str | Path | None) -> dict[str, Any]:
    """The settings the run ``--resume_from_checkpoint last`` continues was started with
    (``config.yaml`` of ``OUTPUT_DIR``, or of the new run being built beside it, its paths
    absolute: :func:`~galaxy_llava.models.folders.run_settings`), or {}."""
    if output_dir is None:
        return {}
    return run_settings(run_folder.resumable(Path(output_dir)), relative_to=output_dir)


def layered_defaults(parser, explicit: dict[str, Any], config: str | None = None,
                     resume: bool = False) -> dict[str, Any]:
    """Defaults below what the user states: ours, the method's, the saved run's (on resume),
    then the YAML file's. ``explicit`` (flags or keyword arguments) are only peeked at for the
    method and output folder."""
    config = find_config(config) if config else None
    from_yaml = _by_field(read_yaml(config), parser, str(config)) if config else {}
    out_dir = explicit.get("output_dir") or from_yaml.get("output_dir")
    if not out_dir:
        raise UserError("no output folder given: pass --output_dir RUN")
    saved = _by_field(saved_settings(out_dir) if resume else {}, parser,
                      f"{out_dir}/{CONFIG_FILE}")
    method = explicit.get("method") or from_yaml.get("method") or saved.get("method")
    return {**TRAINING_DEFAULTS, **device_defaults(), **METHOD_DEFAULTS.get(method, {}), **saved,
            **from_yaml}


def device_defaults() -> dict[str, Any]:
    """bf16 autocast and TF32 on a GPU that has them (DESIGN.md, defect 9: fp32 leaves >10x on the
    table); no pinned memory without one (it only warns)."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "tf32": True}
    return {"use_cpu": True, "dataloader_pin_memory": False}


def _finish(finetune: FinetuneArguments, training) -> tuple[FinetuneArguments, Any]:
    finetune.check()
    check_numbers(training)
    return finetune, training


class _Range(NamedTuple):
    """The values a numeric Trainer setting may take: a finite number from ``low`` to ``high``
    (None: unbounded), an end excluded when ``low_open`` / ``high_open``, an integer when
    ``integer``, or None when ``optional``."""

    name: str
    low: float | None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def check(self, value) -> None:
        """Refuse ``value`` out of range, in one line naming ``--name``."""
        number(f"--{self.name}", value, self.low, self.high, low_open=self.low_open,
               high_open=self.high_open, integer=self.integer, optional=self.optional)


# TrainingArguments accepts inf, nan and negative values for these (and trains a step at
# lr=inf).
_RANGES = (
    _Range("learning_rate", 0, low_open=True),
    _Range("num_train_epochs", 0, low_open=True),
    _Range("max_steps", -1, integer=True),
    _Range("per_device_train_batch_size", 1, integer=True),
    _Range("per_device_eval_batch_size", 1, integer=True),
    _Range("gradient_accumulation_steps", 1, integer=True),
    _Range("warmup_steps", 0),
    _Range("weight_decay", 0),
    _Range("adam_beta1", 0, 1, high_open=True),
    _Range("adam_beta2", 0, 1, high_open=True),
    _Range("adam_epsilon", 0, low_open=True),
    _Range("max_grad_norm", 0),
    _Range("label_smoothing_factor", 0, 1, high_open=True),
    _Range("logging_steps", 0, low_open=True),
    _Range("save_steps", 0, low_open=True),
    _Range("eval_steps", 0, low_open=True, optional=True),
    _Range("save_total_limit", 0, integer=True, optional=True),
    _Range("dataloader_num_workers", 0, integer=True),
)


def check_numbers(training) -> None:
    """Every numeric Trainer setting finite and in range, and the seeds ones numpy accepts;
    checked before any data or model is loaded (one line naming the flag)."""
    for r in _RANGES:
        if hasattr(training, r.name):
            r.check(getattr(training, r.name))
    seed("--seed", training.seed)
    if training.data_seed is not None:
        seed("--data_seed", training.data_seed)


def _argument_error(e: Exception) -> UserError:
    return UserError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _lenient(kind):
    """argparse type that keeps what it cannot convert (the real parser reports it)."""
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            return text
    return convert


def precheck(argv: list[str], resume: bool = True) -> argparse.Namespace:
    """Cheap checks before transformers is even imported, so a mistake costs no model load:
    an ``--output_dir`` that is a file, a dataset, a model or someone's folder; the checkpoint
    ``--resume_from_checkpoint`` names (there and whole; with ``resume``); numeric flags out of
    range (the ranges of :func:`check_numbers`, which checks every source of settings again
    after parsing). Returns the peeked flags."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("config", "method", "output_dir", "resume_from_checkpoint"):
        peek.add_argument(f"--{name}", f"--{name.replace('_', '-')}", default=None)
    for r in _RANGES:
        peek.add_argument(f"--{r.name}", f"--{r.name.replace('_', '-')}", default=None,
                          type=_lenient(int if r.integer else float))
    peek.add_argument("--seed", default=None, type=_lenient(int))
    known, _ = peek.parse_known_args(argv)
    for r in _RANGES:
        value = getattr(known, r.name)
        if isinstance(value, (int, float)):  # a value that is no number: the parser says so
            r.check(value)
    if isinstance(known.seed, int):
        seed("--seed", known.seed)
    run = Path(known.output_dir) if known.output_dir else None
    if run is not None and known.resume_from_checkpoint is None:
        check_kind(run, "run", flag="--output_dir", overwrite_flag="--overwrite_output_dir")
    elif resume and run is not None and not run_folder.interrupted(run):
        run_folder.checkpoint_to_resume(run, known.resume_from_checkpoint)
    return known


def wants_help(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--help`` (which needs no output folder)."""
    return bool({"-h", "--help"} & set(argv))


def print_help() -> None:
    """Print ``galaxy-llava train --help`` without importing transformers when it can: the
    full parser (:func:`build_parser`) costs seconds of imports (torch, through
    TrainingArguments), so its flags are kept as data in the user's cache (keyed by the
    versions and sources they come from) and drawn by plain argparse at the terminal's width:
    the same text, in a fraction of a second after the first time."""
    path = _help_cache()
    spec = read_json_object(path)
    if spec.get("key") != path.stem:
        spec = {"key": path.stem, **help_spec(build_parser())}
        try:
            write_json(path, spec)
        except OSError:  # a read-only home: the help still prints
            pass
    help_parser(spec).print_help()


def _help_cache() -> Path:
    """Where :func:`print_help` keeps the parser's flags: ``galaxy-llava/train-help-KEY.json``
    in ``$XDG_CACHE_HOME`` (default ``~/.cache``); KEY changes with transformers' version and
    with the source of galaxy-llava's own settings."""
    key = hashlib.sha256()
    for part in (metadata.version("transformers"), __version__, sys.version,
                 Path(__file__).read_bytes(), Path(config_module.__file__).read_bytes(),
                 " ".join(shipped_configs())):
        key.update(part if isinstance(part, bytes) else part.encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "galaxy-llava" / f"train-help-{key.hexdigest()[:16]}.json"


def help_spec(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """What ``--help`` shows of ``parser``, as JSON-ready data (:func:`help_parser` draws it)."""
    actions = [{"flags": a.option_strings, "dest": a.dest, "nargs": a.nargs,
                "default": None if a.default is None else str(a.default),
                "choices": [str(c) for c in a.choices] if a.choices else None,
                "metavar": a.metavar, "required": a.required, "help": a.help}
               for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    return {"prog": parser.prog, "description": parser.description, "actions": actions}


def help_parser(spec: dict[str, Any]) -> argparse.ArgumentParser:
    """A plain argparse parser whose ``--help`` is that of the parser :func:`help_spec` read."""
    parser = argparse.ArgumentParser(prog=spec["prog"], description=spec["description"],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for a in spec["actions"]:
        common = {"dest": a["dest"], "default": a["default"], "help": a["help"],
                  "required": a["required"]}
        if a["nargs"] == 0:  # a switch: no value shown
            parser.add_argument(*a["flags"], action="store_const", const=None, **common)
        else:
            metavar = tuple(a["metavar"]) if isinstance(a["metavar"], list) else a["metavar"]
            parser.add_argument(*a["flags"], nargs=a["nargs"], choices=a["choices"],
                                metavar=metavar, **common)
    return parser


def parse_cli(argv: list[str], known: argparse.Namespace | None = None
              ) -> tuple[FinetuneArguments, Any]:
    """Parse ``galaxy-llava train`` flags into (FinetuneArguments, TrainingArguments);
    ``known``: what :func:`precheck` already peeked of them (else it peeks here)."""
    if wants_help(argv):
        print_help()
        raise SystemExit(0)
    if known is None:
        known = precheck(argv, resume=False)
    parser = build_parser()
    explicit = {k: v for k, v in vars(known).items() if v is not None}
    parser.set_defaults(**_argparse_ready(layered_defaults(
        parser, explicit, known.config, resume=known.resume_from_checkpoint is not None)))
    try:
        finetune, training, _ = parser.parse_args_into_dataclasses(argv)
    except ValueError as e:  # TrainingArguments.__post_init__ checks combinations
        raise _argument_error(e) from None
    return _finish(finetune, training)


def parse_settings(settings: dict[str, Any], config: str | None = None
                   ) -> tuple[FinetuneArguments, Any]:
    """The Python API's counterpart of :func:`parse_cli`: ``settings`` by the same names."""
    parser = build_parser()
    settings = _by_field({k.replace("-", "_"): v for k, v in settings.items() if v is not None},
                         parser, "the arguments")
    resume = settings.get("resume_from_checkpoint") is not None
    merged = {**layered_defaults(parser, settings, config, resume), **settings}
    try:
        finetune, training = parser.parse_dict(merged)
    except (ValueError, TypeError) as e:
        raise _argument_error(e) from None
    return _finish(finetune, training)


def _argparse_ready(values: dict[str, Any]) -> dict[str, Any]:
    """argparse converts only string defaults with the flag's type: give containers as JSON-ish
    strings where HfArgumentParser expects them (dict fields take JSON), keep the rest."""
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in values.items()}


def settings_to_save(finetune: FinetuneArguments, training) -> dict[str, Any]:
    """What ``config.yaml`` records: every galaxy-llava setting, and each TrainingArguments field
    that differs from the library's default (so that a resume reproduces the run), with paths
    that work from any folder (:func:`~galaxy_llava.models.folders.portable_settings`). Not the
    output folder: it is the folder that holds the file (and a copy of the file used as a
    ``--config`` then needs an ``--output_dir`` of its own)."""
    from transformers import TrainingArguments

    out = dataclasses.asdict(finetune)
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(training, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(value, enum.Enum):
            value = value.value
        if (value != default and value is not None and _plain(value)
                and f.name not in ("resume_from_checkpoint", "output_dir")):
            out[f.name] = value
    return portable_settings(out, training.output_dir)


def _plain(value) -> bool:
    """A value YAML writes and the parser reads back as it was (not a config object)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, (str, int, float, bool))
