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


def _finished(folder, tag, steps, kind="adapter"):
    """A finished run's outputs in ``folder``, each holding ``tag``."""
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        _checkpoint(folder, step)
    (folder / kind).mkdir()
    (folder / kind / "weights").write_text(tag)
    for name in ("config.yaml", "train_metrics.json", "galaxy_llava.json"):
        (folder / name).write_text(tag)


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("cut", [None, 0, 1, 2, 3, 5, 8])
def test_publish_moves_the_new_run_in_and_a_cut_move_is_finished(tmp_path, monkeypatch, cut):
    """The new run built in RUN/.next-run replaces the previous one (an adapter run by a full
    one here); a kill after any rename leaves what recover() completes to the same end."""
    import os

    run = tmp_path / "run"
    _finished(run, "old", [10, 20])
    (run / "cache").mkdir()
    (run / "cache" / "features").write_text("kept")
    _finished(run / run_folder.NEXT, "new", [5], kind="model")
    expected = {**_contents(run / run_folder.NEXT), "cache/features": "kept"}
    assert run_folder.holds_a_run(run) and run_folder.resumable(run) == run / run_folder.NEXT
    if cut is not None:
        real, calls = os.replace, []

        def replace(a, b):
            if len(calls) == cut:
                raise KeyboardInterrupt  # as kill -9 would stop it, between two renames
            calls.append(a)
            real(a, b)

        monkeypatch.setattr(run_folder.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            run_folder.publish(run)
        monkeypatch.undo()
        assert run_folder.interrupted(run)
        run_folder.recover(run)
    else:
        run_folder.publish(run)
    assert _contents(run) == expected
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert not run_folder.interrupted(run)


def test_work_folder_builds_beside_a_run_and_tidy_drops_a_start_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_folder.work_folder(run, None) == run  # nothing there: built in place
    (run / "cache").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")  # a killed start: nothing of value
    assert run_folder.work_folder(run, None) == run
    _finished(run, "old", [10])
    nxt = run / run_folder.NEXT
    assert run_folder.work_folder(run, None) == nxt
    assert run_folder.work_folder(run, run / "checkpoint-10") == run
    nxt.mkdir()
    (nxt / "loss_log.jsonl").write_text("{}")
    assert run_folder.checkpoint_to_resume(run, "last") == run / "checkpoint-10"
    run_folder.tidy(run)  # the new run never reached a checkpoint: removed
    assert not nxt.exists()
    _checkpoint(nxt, 2)
    assert run_folder.checkpoint_to_resume(run, "last") == nxt / "checkpoint-2"
    assert run_folder.work_folder(run, nxt / "checkpoint-2") == nxt
    run_folder.tidy(run)
    assert (nxt / "checkpoint-2").is_dir()  # resumable: kept
