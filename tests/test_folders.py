"""models.folders: the galaxy_llava.json markers (prompt, kind, base model), telling RUN, model and
other folders apart, and finding a LoRA run's base model. Pure file logic, no model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from galaxy_llava.errors import UserError
from galaxy_llava.models.folders import (
    MARKER,
    abs_if_local,
    adapter_base,
    checkpoint_run,
    is_local,
    portable_settings,
    read_marker,
    read_prompt,
    run_kind,
    run_settings,
    weights_folder,
    write_marker,
    write_prompt,
)

PROMPT = "USER: <image>\nHi\nASSISTANT:"


def test_prompt_storage(tmp_path):
    assert read_prompt(tmp_path) is None
    write_prompt(tmp_path, PROMPT, kind="model", base_model="x")
    assert read_prompt(tmp_path) == PROMPT
    data = json.loads((tmp_path / "galaxy_llava.json").read_text())
    assert data == {"prompt": PROMPT, "kind": "model", "base_model": "x"}


def test_read_prompt_looks_in_the_run_and_its_weights_folder(tmp_path):
    for sub in ("model", "adapter"):
        run = tmp_path / sub / "run"
        (run / sub).mkdir(parents=True)
        write_prompt(run / sub, PROMPT, kind="model")
        assert read_prompt(run) == PROMPT
    write_prompt(tmp_path / "model" / "run", "USER: <image>\nOuter\nASSISTANT:")
    assert read_prompt(tmp_path / "model" / "run") == "USER: <image>\nOuter\nASSISTANT:"


def test_markers_merge_skip_none_and_reject_bad_json(tmp_path):
    assert read_marker(tmp_path) == {}
    write_marker(tmp_path, kind="run", prompt=PROMPT, base_model=None)
    write_marker(tmp_path, method="lora", kind=None)
    assert read_marker(tmp_path) == {"kind": "run", "prompt": PROMPT, "method": "lora"}
    (tmp_path / MARKER).write_text("[1, 2]")
    assert read_marker(tmp_path) == {}
    (tmp_path / MARKER).write_text("{oops")
    with pytest.raises(UserError, match="galaxy_llava.json is not valid JSON"):
        read_marker(tmp_path)


def test_run_kind(tmp_path):
    assert run_kind(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert run_kind(tmp_path) == "model"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert run_kind(tmp_path) == "full"
    (tmp_path / "adapter").mkdir()
    assert run_kind(tmp_path) == "full"  # an adapter folder without its config is not one
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert run_kind(tmp_path) == "adapter"
    assert run_kind(tmp_path / "adapter") == "adapter"  # an adapter folder is one itself
    assert weights_folder(tmp_path) == tmp_path / "adapter"
    assert weights_folder(tmp_path / "adapter") == tmp_path / "adapter"


def test_is_local_and_abs_if_local(tmp_path, monkeypatch):
    assert not is_local("bczhou/tiny-llava-v1-hf") and not is_local("gpt2")
    assert is_local("./runs/lora") and is_local("/no/such/folder") and is_local("a/b/c")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert is_local("org/name")  # an existing folder wins over the Hub id it looks like
    assert abs_if_local("org/name") == str((tmp_path / "org" / "name").resolve())
    assert abs_if_local("other/name") == "other/name" and abs_if_local(None) is None


def test_adapter_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    with pytest.raises(UserError, match="does not name its base model"):
        adapter_base(run)
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "org/hub-model"}))
    assert adapter_base(run) == "org/hub-model"  # peft's record, a Hub id: not checked here
    write_marker(run / "adapter", base_model=str(base))
    assert adapter_base(run) == str(base)
    write_marker(run, base_model=str(tmp_path / "gone"))  # the run's marker comes first
    with pytest.raises(UserError, match="base model of the adapter .* was not found") as e:
        adapter_base(run)
    assert "\n" not in str(e.value)


def test_settings_store_paths_that_work_from_any_folder(tmp_path, monkeypatch):
    """config.yaml's paths: outside the run absolute, inside it relative to the run (so they
    move with it), a local model absolute and a Hub id as it is; read back absolute from
    any working directory."""
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "a" / "tiny").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    saved = portable_settings({"model_name_or_path": "tiny", "data": "data",
                               "feature_cache_dir": "run/cache", "lora_r": 4}, "run")
    assert saved == {"model_name_or_path": str(tmp_path / "a" / "tiny"),
                     "data": str(tmp_path / "a" / "data"), "feature_cache_dir": "cache",
                     "lora_r": 4}
    for hub_id in ("org/name", "gpt2"):  # no such folder here: a Hub id, kept as it is
        assert portable_settings({"model_name_or_path": hub_id}, "run") == {
            "model_name_or_path": hub_id}
    run = tmp_path / "a" / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    elsewhere = tmp_path / "b" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    back = run_settings("../../a/run")
    assert back["data"] == str(tmp_path / "a" / "data")
    assert back["feature_cache_dir"] == str(run / "cache")
    assert back["model_name_or_path"] == saved["model_name_or_path"]
    assert run_settings(tmp_path / "b") == {}
    # A run written before paths were stored so: its relative data still reads from where it
    # was started (and nowhere else can be told).
    (run / "config.yaml").write_text("data: data\n")
    monkeypatch.chdir(tmp_path / "a")
    assert run_settings(run)["data"] == "data"


def test_a_checkpoint_is_a_model_with_its_runs_prompt_and_base(tmp_path):
    """RUN/checkpoint-N (the Trainer's): a LoRA one is an adapter folder, a full one a model
    folder; the prompt and the base model are the run's (its marker, else its config.yaml)."""
    run = tmp_path / "run"
    lora = run / "checkpoint-4"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x/y"}))
    assert checkpoint_run(lora) is None  # no trainer_state.json: not a checkpoint
    (lora / "trainer_state.json").write_text("{}")
    assert checkpoint_run(lora) is None  # nor one of a galaxy-llava run yet
    base = tmp_path / "base"
    base.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(base),
                                                     "prompt": PROMPT}))
    assert checkpoint_run(lora) == run
    assert run_kind(lora) == "adapter" and weights_folder(lora) == lora
    assert read_prompt(lora) == PROMPT and adapter_base(lora) == str(base)
    write_marker(run, kind="run", prompt="USER: <image>\nFinal\nASSISTANT:",
                 base_model=str(tmp_path))
    assert read_prompt(lora) == "USER: <image>\nFinal\nASSISTANT:"
    assert adapter_base(lora) == str(tmp_path)
    full = run / "checkpoint-8"
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "trainer_state.json").write_text("{}")
    assert run_kind(full) == "model" and weights_folder(full) == full
    assert read_prompt(full) == "USER: <image>\nFinal\nASSISTANT:"


# ----------------------------------------------------------------- trained runs, end to end

RUN_PROMPT = "USER: <image>\nWhich galaxy is this?\nASSISTANT:"
FAST = ["--learning_rate", "3e-3", "--per_device_train_batch_size", "4", "--logging_steps", "1"]


def _cli(*argv) -> None:
    from galaxy_llava.cli import main

    assert main([str(a) for a in argv]) == 0, argv


def _described(capsys, model, images) -> list[str]:
    """``describe``'s answers for ``images``, in order."""
    capsys.readouterr()
    _cli("describe", "--model", model, images)
    return [line.split("\t", 1)[1] for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def runs_in_a(tiny_model_dir, prepared_dir, tmp_path_factory):
    """``ROOT``: LoRA and full runs ``ROOT/a/{lora,full}`` trained from ``ROOT/a`` with every
    path typed relative (model, data, run), two epochs with their two checkpoints kept, and a
    prompt of their own."""
    import contextlib
    import os

    root = tmp_path_factory.mktemp("cross")
    (root / "a").mkdir()
    with contextlib.chdir(root / "a"):
        for method in ("lora", "full"):
            _cli("train", "--model", os.path.relpath(tiny_model_dir), "--data",
                 os.path.relpath(prepared_dir), "--method", method, "--output_dir", method,
                 "--num_train_epochs", "2", "--save_total_limit", "2", "--prompt", RUN_PROMPT,
                 *FAST)
    return root


@pytest.mark.slow
def test_a_run_trained_in_one_folder_works_from_another(runs_in_a, tiny_model_dir,
                                                        prepared_dir, monkeypatch, capsys):
    """Trained from ROOT/a, used from ROOT/b/deeper (another depth, so no relative path typed
    in a means the same from there): resume, describe, evaluate, serve; a report from a third
    folder embeds every galaxy; peft's adapter config names its base absolute."""
    import os
    import shutil

    from galaxy_llava.serve import ServedModel, describe_one, example_images

    root = runs_in_a
    shutil.copytree(root / "a" / "lora", root / "a" / "resumed")  # the others stay as trained
    b = root / "b" / "deeper"
    b.mkdir(parents=True)
    monkeypatch.chdir(b)
    run, data = "../../a/resumed", os.path.relpath(prepared_dir)
    steps = json.loads((root / "a" / "resumed" / "train_metrics.json").read_text())["steps"]
    _cli("train", "--output_dir", run, "--resume_from_checkpoint", "last",
         "--num_train_epochs", "3")
    resumed = json.loads((root / "a" / "resumed" / "train_metrics.json").read_text())
    assert resumed["steps"] == steps * 3 // 2

    config = json.loads((root / "a" / "resumed" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())

    answers = _described(capsys, run, f"{data}/images")
    assert len(answers) == len(list((prepared_dir / "images").iterdir()))
    _cli("evaluate", "--model", run, "--data", data, "--split", "train", "--out", "eval",
         "--no-scores")
    metrics = json.loads((b / "eval" / "metrics.json").read_text())
    assert metrics["prompt"] == RUN_PROMPT and metrics["prompt_source"] == "model"

    examples = example_images(run)  # the run's data, as config.yaml records it
    assert examples and all(p.is_relative_to(prepared_dir) for p in examples)
    served = ServedModel.load(run)
    assert served.prompt == RUN_PROMPT
    assert describe_one(served, str(examples[0]))[0].strip()

    c = root / "c"
    c.mkdir()
    monkeypatch.chdir(c)
    _cli("report", "../b/deeper/eval", "--out", "report.html")
    page = (c / "report.html").read_text()
    shown = min(metrics["n"], 24)
    assert page.count('<img src="data:image/jpeg') == shown
    assert "not embedded" not in page and "image missing" not in page


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_folders_are_models_in_every_command(runs_in_a, prepared_dir, method,
                                                        tmp_path, capsys):
    """RUN/checkpoint-N loads with the run's prompt in describe, evaluate, catalogue, serve and
    export; the last one holds the run's final weights, so each answers as the run does."""
    import warnings

    import pandas as pd

    from galaxy_llava.models.loading import load_for_inference
    from galaxy_llava.serve import ServedModel

    run = runs_in_a / "a" / method
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2
    last = checkpoints[-1]
    images = prepared_dir / "images"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no prompt stored" warning: the run's is found
        assert load_for_inference(checkpoints[0])[2] == RUN_PROMPT
    expected = _described(capsys, run, images)
    assert _described(capsys, last, images) == expected

    _cli("evaluate", "--model", last, "--data", prepared_dir, "--out", tmp_path / "eval",
         "--limit", "3", "--no-scores")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["prompt_source"] == "model" and metrics["model"] == str(last)

    _cli("catalogue", "--model", last, "--images", images, "--out", tmp_path / "cat",
         "--no-scores")
    catalogue = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "cat").glob("*.parquet")))
    assert len(catalogue) == len(expected)

    first = sorted(images.iterdir())[0]
    assert ServedModel.load(last).describe([first])[0]["caption"] == expected[0]

    _cli("export", "--run", last, "--out", tmp_path / "export")
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                        "training_args.bin"}
    assert read_prompt(tmp_path / "export") == RUN_PROMPT
    assert _described(capsys, tmp_path / "export", images) == expected


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_load_best_model_at_end_leaves_the_best_checkpoints_weights(
        tiny_model_dir, prepared_dir, tmp_path, method):
    """--load_best_model_at_end with --metric_for_best_model: adapter/ or model/ holds the
    best checkpoint's weights (not the last's), and train_metrics.json names it. The best is
    made the highest validation loss (greater_is_better), which a learning run has first."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    _cli("train", "--model", tiny_model_dir, "--data", prepared_dir, "--method", method,
         "--output_dir", run, "--num_train_epochs", "3", "--save_total_limit", "3",
         "--eval_strategy", "epoch", "--load_best_model_at_end", "--metric_for_best_model",
         "eval_loss", "--greater_is_better", "true", *FAST)
    val = [json.loads(line) for line in (run / "loss_log.jsonl").read_text().splitlines()]
    val = [e for e in val if e["split"] == "validation"]
    best = max(val, key=lambda e: e["loss"])["step"]
    last = max(e["step"] for e in val)
    assert best != last, val  # else the test could not tell the best from the last
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["best_checkpoint"] == f"checkpoint-{best}"

    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    saved = load_file(run / ("adapter" if method == "lora" else "model") / name)
    chosen = load_file(run / f"checkpoint-{best}" / name)
    final = load_file(run / f"checkpoint-{last}" / name)
    assert saved.keys() == chosen.keys()
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
