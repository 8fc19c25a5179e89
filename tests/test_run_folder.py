"""run_folder: refusing to clobber a run, finding the checkpoint to resume, the loss log."""

from __future__ import annotations

import json

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.training import run_folder


def _checkpoint(run, step):
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_checkpoint_to_resume(tmp_path):
    run = tmp_path / "run"
    assert run_folder.checkpoint_to_resume(run, None) is None
    with pytest.raises(UserError, match="does not exist"):
        run_folder.checkpoint_to_resume(run, "last")
    run.mkdir()
    (run / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a galaxy-llava training run"):
        run_folder.checkpoint_to_resume(run, "last")
    (run / "config.yaml").write_text("method: lora\n")
    with pytest.raises(UserError, match="no checkpoint yet"):
        run_folder.checkpoint_to_resume(run, "true")
    _checkpoint(run, 9)
    newest = _checkpoint(run, 10)  # numeric, not lexical, order
    (run / "checkpoint-11").mkdir()  # an unfinished one (no trainer state) is not resumable
    assert run_folder.checkpoint_to_resume(run, "last") == newest
    assert run_folder.checkpoint_to_resume(run, str(run / "checkpoint-9")) == run / "checkpoint-9"
    with pytest.raises(UserError, match="not a Trainer checkpoint"):
        run_folder.checkpoint_to_resume(run, str(run / "checkpoint-11"))


def test_check_fresh_and_clear_previous(tmp_path):
    run = tmp_path / "run"
    run_folder.check_fresh(run, overwrite=False)  # nothing there
    run.mkdir()
    (run / "cache").mkdir()
    run_folder.check_fresh(run, overwrite=False)  # a feature cache alone is no run
    _checkpoint(run, 3)
    (run / "train_metrics.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a training run"):
        run_folder.check_fresh(run, overwrite=False)
    run_folder.check_fresh(run, overwrite=True)
    run_folder.clear_previous(run)
    assert sorted(p.name for p in run.iterdir()) == ["cache"]


def test_loss_log_from_the_trainers_history(tmp_path):
    history = [{"loss": 2.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 1, "grad_norm": 1.0},
               {"eval_loss": 1.5, "epoch": 1.0, "step": 2},
               {"train_runtime": 3.0, "step": 2}]
    rows = run_folder.loss_log(history)
    assert rows == [{"step": 1, "epoch": 0.5, "loss": 2.0, "split": "train", "lr": 1e-3},
                    {"step": 2, "epoch": 1.0, "loss": 1.5, "split": "validation", "lr": None}]
    run_folder.write_loss_log(tmp_path, rows[:1])
    run_folder.append_loss_log(tmp_path, rows[1:])
    lines = (tmp_path / "loss_log.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    assert run_folder.plot_losses(rows, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
