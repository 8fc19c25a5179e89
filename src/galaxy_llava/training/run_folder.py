"""The RUN folder around the Trainer's own files: refusing to clobber a run, finding the
checkpoint to resume, building a new run beside the previous one, the loss log and curve, and
the final weights saved atomically.

The layout (the outputs' names, what holds a run) is :mod:`galaxy_llava.run_layout`'s.

A checkpoint counts once its ``trainer_state.json`` (the Trainer writes it last) reads back;
one cut short by a crash is a leftover. A run started over where a run is
(``--overwrite_output_dir``) is built in ``RUN/.next-run/`` and moved in when it has finished
(:func:`publish`): until then every reader finds the previous run whole in ``RUN``, and
``--resume_from_checkpoint last`` continues the new one. What a killed start left without a
checkpoint is moved into ``.previous-run/`` of the folder the new start writes in: a failure
before the new start's first checkpoint puts it back, so the folder is as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from galaxy_llava.checks import check_checkpoint
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, write_json, write_jsonl
from galaxy_llava.outputs import clean_leftovers
from galaxy_llava.records import split_name
from galaxy_llava.run_layout import (BACKUP, CHECKPOINT, LOSS_LOG, NEXT, REPLACED, TRAIN_METRICS,
                                     WEIGHTS, RunFolder)
from galaxy_llava.run_layout import complete_checkpoint as _complete

_PARTIAL_WEIGHTS = tuple(f".{w}.partial" for w in WEIGHTS.values())  # saving.install_weights'


def checkpoints(run: Path) -> list[Path]:
    """The Trainer's finished ``checkpoint-N`` folders of ``run``, oldest first."""
    return RunFolder(run).checkpoints()


def holds_a_run(run: Path) -> bool:
    """Whether ``run`` holds something of value (:meth:`RunFolder.holds_a_run`)."""
    return RunFolder(run).holds_a_run()


def _outputs(folder: Path) -> list[Path]:
    return RunFolder(folder).outputs()


def _started(run: Path) -> bool:
    return Path(run).is_dir() and bool(_outputs(run) or _outputs(Path(run) / NEXT))


def resumable(run: Path) -> Path:
    """The folder whose checkpoints ``--resume_from_checkpoint last`` continues: the new run
    being built in ``RUN/.next-run/`` once it has one, else ``run`` itself."""
    return Path(run) / NEXT if checkpoints(Path(run) / NEXT) else Path(run)


def work_folder(run: Path, resume: Path | None) -> Path:
    """Where this start writes: ``RUN/.next-run/`` for a new run where ``run`` holds one (kept
    whole for readers until :func:`publish`) or when continuing the run being built there;
    ``run`` itself otherwise. Decided from what no start changes before it, so that every
    process of a distributed run decides alike."""
    run = Path(run)
    if resume is not None:
        return run / NEXT if Path(resume).resolve().parent == (run / NEXT).resolve() else run
    return run / NEXT if holds_a_run(run) else run


def checkpoint_to_resume(run: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run; ``last`` / ``true`` is the
    newest finished one in ``run``; anything else is a checkpoint folder. Its files are checked
    (a truncated optimizer state is one line, not a traceback). One-line errors otherwise."""
    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", ""):
        return None
    if str(resume_from_checkpoint).lower() in ("last", "true"):
        if not Path(run).is_dir():
            raise UserError(f"cannot resume: run folder {run} does not exist")
        found = checkpoints(resumable(run))
        if found:
            check_checkpoint(found[-1])
            return found[-1]
        if _started(run):
            raise UserError(f"{run} has no checkpoint yet (one is written every save_steps or "
                            "epoch); train again without --resume_from_checkpoint: the "
                            "unfinished start is replaced")
        raise UserError(f"{run} is not a galaxy-llava training run (no checkpoint-N/ inside); "
                        "cannot resume it")
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"{path} is not a Trainer checkpoint (no trainer_state.json)")
    check_checkpoint(path)
    return path


def check_fresh(run: Path, overwrite: bool) -> None:
    """Refuse to start a new run where one already is, unless asked to overwrite."""
    if holds_a_run(run) and not overwrite:
        raise UserError(f"{run} already holds a training run; pass --resume_from_checkpoint last "
                        "to continue it, --overwrite_output_dir to start over, or choose another "
                        "--output_dir")


def clear_previous(run: Path) -> None:
    """Remove a run's outputs and checkpoints (``cache/`` and ``.previous-run/`` stay)."""
    for target in _outputs(run):
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def tidy(run: Path) -> None:
    """Remove what crashes left in ``run``: unfinished checkpoints, half-saved weights,
    temporary files of atomic writes and a new run's folder that never reached a checkpoint."""
    run = Path(run)
    if not checkpoints(run / NEXT) and not (run / NEXT / BACKUP).exists():
        shutil.rmtree(run / NEXT, ignore_errors=True)
    for p in run.glob(CHECKPOINT + "*"):
        if p.is_dir() and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
    for name in _PARTIAL_WEIGHTS:
        shutil.rmtree(run / name, ignore_errors=True)
    clean_leftovers(run)


def set_aside(run: Path) -> None:
    """Move a previous run's outputs (or a killed start's) into ``RUN/.previous-run/``."""
    run = Path(run)
    shutil.rmtree(run / BACKUP, ignore_errors=True)
    items = _outputs(run)
    if not items:
        return
    (run / BACKUP).mkdir()
    for p in items:
        os.replace(p, run / BACKUP / p.name)


def restore_aside(run: Path) -> None:
    """Undo a failed start: remove what it wrote, put the set-aside outputs back."""
    run = Path(run)
    clear_previous(run)
    backup = run / BACKUP
    if backup.is_dir():
        for p in list(backup.iterdir()):
            os.replace(p, run / p.name)
        backup.rmdir()


def drop_aside(run: Path) -> None:
    """Forget the set-aside outputs: the new run has made something of its own."""
    shutil.rmtree(Path(run) / BACKUP, ignore_errors=True)


def recover(run: Path) -> None:
    """After a start that was killed: finish moving in a new run that had finished (or was
    being moved in); in each folder a start writes in, keep what it wrote if it reached a
    checkpoint, else put back what it had set aside."""
    run = Path(run)
    if (run / REPLACED).exists() or (run / NEXT / TRAIN_METRICS).is_file():
        publish(run)
    for folder in (run, run / NEXT):
        if (folder / BACKUP).is_dir():
            drop_aside(folder) if checkpoints(folder) else restore_aside(folder)


def interrupted(run: Path) -> bool:
    """Whether a killed start left ``run`` for :func:`recover` to put in order."""
    run = Path(run)
    return any(p.exists() for p in (run / REPLACED, run / NEXT / TRAIN_METRICS,
                                    run / BACKUP, run / NEXT / BACKUP))


def publish(run: Path) -> None:
    """Move the finished run in ``RUN/.next-run/`` into ``RUN`` in place of the previous run's
    outputs, which are then removed. What comes in is listed first
    (``.replaced-run/incoming.json``), so that :func:`recover` can finish a move cut short;
    each output is renamed whole, so a reader finds the previous run's or the new run's."""
    run = Path(run)
    new, old = run / NEXT, run / REPLACED
    listing = old / "incoming.json"
    if not listing.is_file():
        if not (new / TRAIN_METRICS).is_file():  # cut before the listing: nothing moved
            shutil.rmtree(old, ignore_errors=True)
            return
        shutil.rmtree(old, ignore_errors=True)
        drop_aside(new)
        old.mkdir()
        write_json(listing, [p.name for p in _outputs(new)])
    incoming = json.loads(listing.read_text())
    for name in incoming:  # name by name: the previous output out, the new one in
        if (new / name).exists():
            if (run / name).exists():
                os.replace(run / name, old / name)
            os.replace(new / name, run / name)
    for p in _outputs(run):
        if p.name not in incoming:  # the previous run's, with no new counterpart
            os.replace(p, old / p.name)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old)


def loss_log(log_history: list[dict]) -> list[dict]:
    """The Trainer's ``log_history`` as loss-log rows ``{step, epoch, loss, split, lr}``."""
    rows = []
    for e in log_history:
        if "loss" in e:
            rows.append({"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"],
                         "split": "train", "lr": e.get("learning_rate")})
        elif "eval_loss" in e:
            rows.append({"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"],
                         "split": "validation", "lr": None})
    return rows


def write_loss_log(run: Path, rows: list[dict]) -> None:
    """Rewrite ``RUN/loss_log.jsonl`` (atomically)."""
    write_jsonl(Path(run) / LOSS_LOG, rows)


def append_loss_log(run: Path, rows: list[dict]) -> None:
    """Append rows to ``RUN/loss_log.jsonl`` (live progress; rewritten whole at the end)."""
    with open(Path(run) / LOSS_LOG, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: Path) -> Path:
    """Training and validation loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, style in (("train", "-"), ("validation", "o-")):
        pts = [(e["step"], e["loss"]) for e in rows
               if split_name(e["split"]) == split and e["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.set_title("galaxy-llava training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
