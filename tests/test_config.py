"""config: galaxy-llava's own settings, without torch, and the configs shipped in the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import loaded_by

from galaxy_llava.config import FinetuneArguments, find_config, read_yaml, shipped_configs
from galaxy_llava.errors import UserError


def test_config_imports_neither_torch_nor_model_code():
    assert loaded_by("galaxy_llava.config", ("torch", "transformers", "galaxy_llava.models")) == []


def test_check_accepts_defaults_and_names_the_bad_value():
    assert FinetuneArguments(method="lora", data="D").check().lora_r == 8
    with pytest.raises(UserError, match="invalid value for lora_r: 0"):
        FinetuneArguments(method="lora", data="D", lora_r=0).check()
    with pytest.raises(UserError, match="unknown lora_projector 'half'"):
        FinetuneArguments(method="lora", data="D", lora_projector="half").check()
    with pytest.raises(UserError, match="no data given"):
        FinetuneArguments(method="full").check()
    assert FinetuneArguments(method="lora", data="D").caption_targets == "caption"
    assert FinetuneArguments(method="lora", data="D", caption_targets="votes").check()
    with pytest.raises(UserError, match="unknown caption_targets 'vote'; expected one of "
                                        "caption, votes"):
        FinetuneArguments(method="lora", data="D", caption_targets="vote").check()


def test_read_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning-rate: 1.0e-4\nmethod: lora\n")
    assert read_yaml(f) == {"learning_rate": 1e-4, "method": "lora"}
    with pytest.raises(UserError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_shipped_configs_are_the_package_yaml_files():
    import galaxy_llava

    folder = Path(galaxy_llava.__file__).parent / "configs"
    shipped = shipped_configs()
    assert sorted(shipped) == sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"lora", "full", "demo-lora", "demo-full"} <= set(shipped)
    for path in shipped.values():
        assert path.parent == folder and read_yaml(path)["method"] in ("full", "lora")


def test_find_config_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone's root: names still work
    assert find_config("demo-lora") == shipped_configs()["demo-lora"]
    assert find_config("demo-lora.yaml") == shipped_configs()["demo-lora"]
    own = tmp_path / "mine.yaml"
    own.write_text("method: full\n")
    assert find_config(str(own)) == own and find_config("mine.yaml") == Path("mine.yaml")
    (tmp_path / "lora").write_text("method: full\n")  # a file of that name wins over the shipped
    assert find_config("lora") == Path("lora")


@pytest.mark.parametrize("value", ["demo-qlora", "configs/lora.yaml", "nope.yaml"])
def test_unknown_config_is_one_line_listing_the_shipped(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        find_config(value)
    message = str(e.value)
    assert "\n" not in message and repr(value) in message
    assert message.endswith("shipped config: " + ", ".join(sorted(shipped_configs())))
