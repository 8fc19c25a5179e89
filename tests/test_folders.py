"""models.folders: the galaxy_llava.json markers (prompt, kind, base model), telling RUN, model and
other folders apart, and finding a LoRA run's base model. Pure file logic, no model."""

from __future__ import annotations

import json

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.models.folders import (
    MARKER,
    abs_if_local,
    adapter_base,
    is_local,
    read_marker,
    read_prompt,
    run_kind,
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
