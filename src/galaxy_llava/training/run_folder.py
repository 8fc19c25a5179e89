"""The RUN folder around the Trainer's own files: refusing to clobber a run, finding the
checkpoint to resume, the loss log and curve, and the final weights saved atomically.

Layout: ``config.yaml`` (every setting), ``checkpoint-N/`` (the Trainer's, resumable),
``loss_log.jsonl``, ``loss_curve.png``, ``train_metrics.json``, ``adapter/`` (LoRA) or ``model/``
(full), ``galaxy_llava.json``; ``runs/`` holds TensorBoard events when ``report_to`` asks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, write_jsonl

# What a previous run leaves; removed on --overwrite_output_dir (cache/ is kept: still valid).
RUN_OUTPUTS = ("config.yaml", "train_metrics.json", "loss_log.jsonl", "loss_curve.png",
               "adapter", "model", "galaxy_llava.json", "runs")


def checkpoints(run: Path) -> list[Path]:
    """The Trainer's ``checkpoint-N`` folders of ``run`` that hold a trainer state, oldest first."""
    found = [p for p in Path(run).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def holds_a_run(run: Path) -> bool:
    """Whether ``run`` already holds a training run's outputs."""
    run = Path(run)
    return run.is_dir() and (any((run / f).exists() for f in ("config.yaml", "train_metrics.json"))
                             or bool(list(run.glob("checkpoint-*"))))


def checkpoint_to_resume(run: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint a run continues from: None for a fresh run; ``last`` / ``true`` is the
    newest in ``run``; anything else is a checkpoint folder. One-line errors otherwise."""
    if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", ""):
        return None
    if str(resume_from_checkpoint).lower() in ("last", "true"):
        if not Path(run).is_dir():
            raise UserError(f"cannot resume: run folder {run} does not exist")
        found = checkpoints(run)
        if found:
            return found[-1]
        if holds_a_run(run):
            raise UserError(f"{run} has no checkpoint yet (one is written every save_steps or "
                            "epoch); train again without --resume_from_checkpoint, adding "
                            "--overwrite_output_dir")
        raise UserError(f"{run} is not a galaxy-llava training run (no checkpoint-N/ inside); "
                        "cannot resume it")
    path = Path(resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"{path} is not a Trainer checkpoint (no trainer_state.json)")
    return path


def check_fresh(run: Path, overwrite: bool) -> None:
    """Refuse to start a new run where one already is, unless asked to overwrite."""
    if holds_a_run(run) and not overwrite:
        raise UserError(f"{run} already holds a training run; pass --resume_from_checkpoint last "
                        "to continue it, --overwrite_output_dir to start over, or choose another "
                        "--output_dir")


def clear_previous(run: Path) -> None:
    """Remove a previous run's outputs and checkpoints (on overwrite)."""
    for target in [*(Path(run) / n for n in RUN_OUTPUTS), *Path(run).glob("checkpoint-*")]:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def loss_log(log_history: list[dict]) -> list[dict]:
    """The Trainer's ``log_history`` as loss-log rows ``{step, epoch, loss, split, lr}``."""
    rows = []
    for e in log_history:
        if "loss" in e:
            rows.append({"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"],
                         "split": "train", "lr": e.get("learning_rate")})
        elif "eval_loss" in e:
            rows.append({"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"],
                         "split": "val", "lr": None})
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

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(e["step"], e["loss"]) for e in rows if e["split"] == split and e["loss"] is not None]
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
