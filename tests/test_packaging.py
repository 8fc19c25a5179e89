"""Packaging: a wheel built from the source and installed (not editable) into a folder of its own
runs ``galaxy-llava train --config demo-lora`` from another folder, its config read from the
installed package, not from the clone; requirements.lock pins every requirement inside
pyproject.toml's ranges."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           MPLBACKEND="Agg")


def _run(argv: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder a wheel of this source was installed into (``pip install --target``)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "wheels"], cwd=tmp)
    (wheel,) = (tmp / "wheels").glob("galaxy_llava-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("lora", "full", "demo-lora", "demo-full"):
        assert f"galaxy_llava/configs/{config}.yaml" in names, names
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], cwd=tmp)
    return site


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_finds_them_by_name(installed, tmp_path):
    code = ("import galaxy_llava, galaxy_llava.config as c; from importlib import metadata; "
            "print(galaxy_llava.__file__); print(c.find_config('demo-lora')); "
            "print(metadata.version('galaxy-llava'))")
    out = _run([sys.executable, "-c", code], cwd=tmp_path,
               env={**ENV, "PYTHONPATH": str(installed)}).stdout.split("\n")
    module, config, version = out[:3]
    assert Path(module).is_relative_to(installed), module  # the installed copy, not the clone
    assert Path(config) == installed / "galaxy_llava" / "configs" / "demo-lora.yaml"
    import galaxy_llava

    assert version == galaxy_llava.__version__


@pytest.mark.slow
def test_the_installed_command_trains_with_a_shipped_config_from_any_folder(
        installed, tiny_model_dir, prepared_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = elsewhere / "run"
    _run([installed / "bin" / "galaxy-llava", "train", "--config", "demo-lora",
          "--model", tiny_model_dir, "--data", prepared_dir, "--output_dir", run,
          "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
          "--eval_strategy", "no"], cwd=elsewhere, env={**ENV, "PYTHONPATH": str(installed)})
    settings = yaml.safe_load((run / "config.yaml").read_text())
    # demo-lora's own values, under the flags given here
    assert (settings["method"], settings["lora_r"], settings["learning_rate"]) == ("lora", 16, 3e-3)
    assert settings["per_device_train_batch_size"] == 4
    assert (run / "adapter" / "adapter_config.json").is_file()


def _locked() -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of requirements.lock."""
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, version = line.split(" ")[0].split("==")
            out[canonicalize_name(name)] = version
    return out


def test_the_lock_pins_every_requirement_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    required = [Requirement(r) for r in project["dependencies"]
                + project["optional-dependencies"]["test"]]
    for req in required:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock has {req.name}=={locked[name]}, outside {req}: run `make lock`")
    # every pin carries its hashes, so `pip install --require-hashes` installs the lock as is
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [i for i, line in enumerate(lines) if "==" in line and not line[:1].isspace()
            and not line.startswith("#")]
    assert len(pins) == len(locked)
    for i in pins:
        assert lines[i].endswith("\\") and "--hash=sha256:" in lines[i + 1], lines[i]

