"""run_layout: a run folder's outputs, whether a folder holds a run, and its training snapshot."""

from __future__ import annotations

import json

from galaxy_llava import run_layout
from galaxy_llava.run_layout import RunFolder, run_path, training_snapshot
from test_evaluate import _fake_run


def test_training_snapshot_reads_the_run_folder(tmp_path):
    snap = training_snapshot(_fake_run(tmp_path / "run", seed=7))
    assert snap["settings"] == {"method": "lora", "learning_rate": 1e-4, "epochs": 2,
                                "max_steps": None, "batch_size": None, "lora_r": 4,
                                "lora_alpha": 8, "seed": 7}
    assert snap["train_metrics"]["steps"] == 6
    assert snap["loss"] == [{"step": 3, "epoch": 1.0, "loss": 2.5, "split": "train"}]
    # config.yaml leaves out what equals the library default: the seed is then Trainer's 42
    snap = training_snapshot(_fake_run(tmp_path / "run2"))
    assert snap["settings"]["seed"] == 42
    (tmp_path / "empty").mkdir()
    assert training_snapshot(tmp_path / "empty") is None
    assert training_snapshot(tmp_path / "missing") is None


def _checkpoint(folder, step, finished=True):
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}) if finished
                                             else '{"global_st')
    return ckpt


def test_what_holds_a_run(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.holds_a_run()  # no folder
    (run / "cache").mkdir(parents=True)
    (run / "config.yaml").write_text("method: lora\n")
    _checkpoint(run.path, 4, finished=False)
    assert not run.holds_a_run()  # a start killed before its first checkpoint
    assert [p.name for p in run.outputs()] == ["config.yaml", "checkpoint-4"]
    _checkpoint(run.path / run_layout.NEXT, 2)
    assert run.holds_a_run() and run.checkpoints() == []  # a new run's, built beside
    for name in ("train_metrics.json", "adapter", "model"):  # a finished run's
        (tmp_path / name / name).mkdir(parents=True)
        assert RunFolder(tmp_path / name).holds_a_run(), name


def test_checkpoints_are_the_finished_ones_in_step_order(tmp_path):
    for step in (10, 9, 100):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 200, finished=False)
    (tmp_path / "checkpoint-last").mkdir()
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == [
        "checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_run_path_names_only_a_trained_folder(tmp_path):
    assert run_path(tmp_path) is None
    (tmp_path / "config.yaml").write_text("method: full\n")
    assert run_path(tmp_path) is None  # settings alone: nothing trained yet
    (tmp_path / "loss_log.jsonl").write_text("")
    assert run_path(tmp_path) == str(tmp_path.resolve())
    assert run_path(tmp_path / "loss_log.jsonl") is None  # a file is no run


def test_what_marks_a_folder_as_a_run(tmp_path):
    assert not run_layout.looks_like_a_run({"notes.txt", "model"}, tmp_path)  # a bare model/
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_layout.looks_like_a_run({"model"}, tmp_path)
    assert run_layout.looks_like_a_run({"checkpoint-3"}, tmp_path / "x")
    assert run_layout.looks_like_a_run({".previous-run"}, tmp_path / "x")


def test_a_runs_kind_names_its_weights_folder(tmp_path):
    from galaxy_llava.models.folders import run_kind, weights_folder

    for kind, config in (("adapter", "adapter_config.json"), ("full", "config.json")):
        run = RunFolder(tmp_path / kind)
        run.weights(kind).mkdir(parents=True)
        (run.weights(kind) / config).write_text("{}")
        assert run_kind(run.path) == kind and weights_folder(run.path) == run.weights(kind)
    assert RunFolder(tmp_path).weights("full").name == "model"
