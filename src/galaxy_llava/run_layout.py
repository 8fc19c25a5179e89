"""What a training RUN folder holds, known in one place: the names of its outputs, whether a
folder holds a run, and what it says of its training (the snapshot an evaluation stores).

Layout: ``config.yaml`` (every setting), ``checkpoint-N/`` (the Trainer's, resumable),
``loss_log.jsonl``, ``loss_curve.png``, ``train_metrics.json``, the weights in ``adapter/``
(a LoRA run) or ``model/`` (a full run), ``galaxy_llava.json`` (the marker), ``runs/``
(TensorBoard events) and ``cache/`` (features, kept across runs). While a new run is built
beside a finished one: ``.next-run/``, ``.previous-run/`` and ``.replaced-run/``
(:mod:`galaxy_llava.training.run_folder` writes and moves them).

Names: a run's kind is "adapter" (LoRA, QLoRA) or "full", as its ``method`` says and as
:func:`galaxy_llava.models.folders.run_kind` and resuming report it; "model" names a folder of
whole weights, so a full run's weights sub-folder is ``model/`` and that folder's marker says
"model" (what :func:`galaxy_llava.saving.install_weights` takes is the sub-folder's kind).
``WEIGHTS`` maps the one to the other; "full" wins for runs because it is what users type, and
"model" stays for the folder because the runs already written say so. Plain file names, no
torch: :mod:`galaxy_llava.outputs` reads them to tell a run folder from other outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from galaxy_llava.config import read_yaml
from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object

SETTINGS = "config.yaml"
TRAIN_METRICS = "train_metrics.json"
LOSS_LOG = "loss_log.jsonl"
LOSS_CURVE = "loss_curve.png"
MARKER = "galaxy_llava.json"
EVENTS = "runs"
CACHE = "cache"
CHECKPOINT = "checkpoint-"
TRAINER_STATE = "trainer_state.json"  # in every Trainer checkpoint, written last
WEIGHTS = {"adapter": "adapter", "full": "model"}  # a run's kind: the folder of its weights
BACKUP = ".previous-run"  # a run set aside while a new one starts
NEXT = ".next-run"  # a new run built beside the previous one
REPLACED = ".replaced-run"  # the previous run's outputs while the new one is moved in

# What a previous run leaves; set aside on a fresh start (cache/ is kept: still valid).
RUN_OUTPUTS = (SETTINGS, TRAIN_METRICS, LOSS_LOG, LOSS_CURVE, *WEIGHTS.values(), MARKER, EVENTS)
# What a finished run has trained: its weights or its final metrics.
_FINISHED = (TRAIN_METRICS, *WEIGHTS.values())
# Names that mark a folder as a run's when telling outputs apart (a full run's model/ counts
# only with its config.json: a bare model/ could be anything's).
RUN_MARKERS = frozenset({SETTINGS, TRAIN_METRICS, LOSS_LOG, WEIGHTS["adapter"], CACHE, MARKER,
                         EVENTS, BACKUP})


def checkpoint_step(p: Path) -> int | None:
    """The step N of a ``checkpoint-N`` folder name, None for any other name."""
    tail = p.name.split("-")[-1]
    return int(tail) if p.name.startswith(CHECKPOINT) and tail.isdigit() else None


def complete_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint was finished: its trainer state (written last) reads back."""
    try:
        return isinstance(json.loads((checkpoint / TRAINER_STATE).read_text()), dict)
    except (OSError, ValueError):
        return False


def looks_like_a_run(names: set[str], folder: Path) -> bool:
    """Whether a folder whose entries are ``names`` is (or was being made) a training run."""
    return bool(names & RUN_MARKERS or any(n.startswith(CHECKPOINT) for n in names)
                or (folder / WEIGHTS["full"] / "config.json").is_file())


@dataclass(frozen=True)
class RunFolder:
    """A training RUN folder: the paths of its outputs, whether it holds a run, and what it
    says of its training."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def settings(self) -> Path:
        return self.path / SETTINGS

    @property
    def train_metrics(self) -> Path:
        return self.path / TRAIN_METRICS

    @property
    def loss_log(self) -> Path:
        return self.path / LOSS_LOG

    @property
    def next_run(self) -> "RunFolder":
        """The new run being built beside this one."""
        return RunFolder(self.path / NEXT)

    def weights(self, kind: str) -> Path:
        """The weights folder of a run of ``kind`` ("adapter" or "full")."""
        return self.path / WEIGHTS[kind]

    def outputs(self) -> list[Path]:
        """The run's outputs and checkpoints present (finished or not)."""
        return [p for p in (*(self.path / n for n in RUN_OUTPUTS),
                            *sorted(self.path.glob(CHECKPOINT + "*"))) if p.exists()]

    def checkpoints(self) -> list[Path]:
        """The Trainer's finished ``checkpoint-N`` folders (a readable trainer state), oldest
        first."""
        found = [p for p in self.path.glob(CHECKPOINT + "*")
                 if checkpoint_step(p) is not None and p.is_dir() and complete_checkpoint(p)]
        return sorted(found, key=checkpoint_step)

    def holds_a_run(self) -> bool:
        """Whether the folder holds something of value: a finished checkpoint (its own or a new
        run's being built beside it) or a finished run's weights and metrics (a start killed
        before its first checkpoint does not count)."""
        return self.path.is_dir() and (any((self.path / f).exists() for f in _FINISHED)
                                       or bool(self.checkpoints())
                                       or bool(self.next_run.checkpoints()))

    def has_trained(self) -> bool:
        """Whether the folder holds what training writes as it goes or at its end (weights,
        final metrics, a loss log): a model to evaluate that came from a run."""
        return self.path.is_dir() and any((self.path / m).exists()
                                          for m in (*_FINISHED, LOSS_LOG))

    def snapshot(self) -> dict | None:
        """What the folder says of its training, read now: ``settings`` (method, learning rate,
        epochs, batch size, LoRA rank and alpha, seed, from ``config.yaml`` and
        ``train_metrics.json``), ``train_metrics`` and the ``loss`` log. An evaluation stores it
        in ``metrics.json`` so a later resume (more epochs, other weights) cannot change what a
        report says was evaluated. None when the folder holds none of these."""
        run = self.path
        if not run.is_dir():
            return None
        tm = read_json_object(self.train_metrics) or None
        try:
            config = read_yaml(self.settings) if self.settings.is_file() else {}
        except (UserError, OSError, ValueError):
            config = {}
        loss = []
        try:
            lines = self.loss_log.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupted run
            if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
                loss.append({k: rec.get(k) for k in ("step", "epoch", "loss", "split")})
        if tm is None and not config and not loss:
            return None
        known = {**(tm or {}), **config}

        def first(*keys: str) -> Any:
            return next((known[k] for k in keys if known.get(k) is not None), None)

        method = first("method")
        settings = {"method": method, "learning_rate": first("learning_rate", "lr"),
                    "epochs": first("num_train_epochs", "epochs"), "max_steps": first("max_steps"),
                    "batch_size": first("per_device_train_batch_size", "batch_size"),
                    "lora_r": first("lora_r") if method in ("lora", "qlora") else None,
                    "lora_alpha": first("lora_alpha") if method in ("lora", "qlora") else None,
                    "seed": first("seed")}
        if settings["seed"] is None and config:  # config.yaml leaves out the library's defaults
            settings["seed"] = _training_default("seed")
        return {"settings": settings, "train_metrics": tm, "loss": loss}


def run_path(model: str | Path) -> str | None:
    """The absolute path of ``model`` when it is a training run folder, else None."""
    return str(Path(model).resolve()) if RunFolder(model).has_trained() else None


def training_snapshot(run: str | Path) -> dict | None:
    """:meth:`RunFolder.snapshot` of the folder ``run``."""
    return RunFolder(run).snapshot()


def _training_default(name: str) -> Any:
    """A TrainingArguments field's library default (what a run left out of config.yaml ran
    with); transformers only imported when a run's settings leave one out."""
    from transformers import TrainingArguments

    return next((f.default for f in dataclasses.fields(TrainingArguments) if f.name == name), None)
