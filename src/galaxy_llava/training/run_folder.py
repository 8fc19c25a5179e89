"""The RUN folder around the Trainer's own files: refusing to clobber a run, finding the
checkpoint to resume, setting a previous run aside until the new one has made something, the
loss log and curve, and the final weights saved atomically.

Layout: ``config.yaml`` (every setting), ``checkpoint-N/`` (the Trainer's, resumable),
``loss_log.jsonl``, ``loss_curve.png``, ``train_metrics.json``, ``adapter/`` (LoRA) or ``model/``
(full), ``galaxy_llava.json``; ``runs/`` holds TensorBoard events when ``report_to`` asks.

A checkpoint counts once its ``trainer_state.json`` (the Trainer writes it last) reads back;
one cut short by a crash is a leftover. A run started over (or started where a killed attempt
left no checkpoint) first moves what was there into ``.previous-run/``: a failure before the
new run's first checkpoint puts it back, so the folder is as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, write_jsonl
from galaxy_llava.outputs import clean_leftovers

# What a previous run leaves; set aside on a fresh start (cache/ is kept: still valid).
RUN_OUTPUTS = ("config.yaml", "train_metrics.json", "loss_log.jsonl", "loss_curve.png",
               "adapter", "model", "galaxy_llava.json", "runs")
BACKUP = ".previous-run"
_PARTIAL_WEIGHTS = (".adapter.partial", ".model.partial")  # models.runs.install_weights'


def _step(p: Path) -> int | None:
    tail = p.name.split("-")[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def _complete(checkpoint: Path) -> bool:
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def checkpoints(run: Path) -> list[Path]:
    """The Trainer's finished ``checkpoint-N`` folders of ``run`` (a readable trainer state),
    oldest first."""
    found = [p for p in Path(run).glob("checkpoint-*")
             if _step(p) is not None and p.is_dir() and _complete(p)]
    return sorted(found, key=_step)


def holds_a_run(run: Path) -> bool:
    """Whether ``run`` holds something of value: a finished checkpoint or a finished run's
    weights and metrics (a start killed before its first checkpoint does not count)."""
    run = Path(run)
    return run.is_dir() and (any((run / f).exists() for f in ("train_metrics.json", "adapter",
                                                              "model"))
                             or bool(checkpoints(run)))


def _started(run: Path) -> bool:
    return Path(run).is_dir() and (any((Path(run) / f).exists() for f in RUN_OUTPUTS)
                                   or bool(list(Path(run).glob("checkpoint-*"))))


def checkpoint_to_resume(run: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run; ``last`` / ``true`` is the
    newest finished one in ``run``; anything else is a checkpoint folder. Its files are checked
    (a truncated optimizer state is one line, not a traceback). One-line errors otherwise."""
    from galaxy_llava.checks import check_checkpoint

    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", ""):
        return None
    if str(resume_from_checkpoint).lower() in ("last", "true"):
        if not Path(run).is_dir():
            raise UserError(f"cannot resume: run folder {run} does not exist")
        found = checkpoints(run)
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
    for target in [*(Path(run) / n for n in RUN_OUTPUTS), *Path(run).glob("checkpoint-*")]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def tidy(run: Path) -> None:
    """Remove what crashes left in ``run``: unfinished checkpoints, half-saved weights and
    temporary files of atomic writes."""
    run = Path(run)
    for p in run.glob("checkpoint-*"):
        if p.is_dir() and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
    for name in _PARTIAL_WEIGHTS:
        shutil.rmtree(run / name, ignore_errors=True)
    clean_leftovers(run)


def set_aside(run: Path) -> None:
    """Move a previous run's outputs (or a killed start's) into ``RUN/.previous-run/``."""
    run = Path(run)
    shutil.rmtree(run / BACKUP, ignore_errors=True)
    items = [p for p in (*(run / n for n in RUN_OUTPUTS), *run.glob("checkpoint-*"))
             if p.exists()]
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
    """After a start that was killed: keep the new run if it reached a checkpoint, else put
    the previous one back."""
    if (Path(run) / BACKUP).is_dir():
        drop_aside(run) if checkpoints(run) else restore_aside(run)


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
    write_jsonl(Path(run) / "loss_log.jsonl", rows)


def append_loss_log(run: Path, rows: list[dict]) -> None:
    """Append rows to ``RUN/loss_log.jsonl`` (live progress; rewritten whole at the end)."""
    with open(Path(run) / "loss_log.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def plot_losses(rows: list[dict], path: Path) -> Path:
    """Training and validation loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from galaxy_llava.records import split_name

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
