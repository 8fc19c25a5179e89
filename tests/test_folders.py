"""models.folders: the galaxy_llava.json markers (prompt, kind, base model), telling RUN, model and
other folders apart, and finding a LoRA run's base model. Pure file logic, no model."""

from __future__ import annotations

import json

import pytest
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
