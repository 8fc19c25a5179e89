"""config: galaxy-llava's own settings, without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from galaxy_llava.config import FinetuneArguments, read_yaml
from galaxy_llava.errors import UserError


def test_config_imports_neither_torch_nor_model_code():
    code = ("import sys, galaxy_llava.config; "
            "bad = [m for m in ('torch', 'transformers', 'galaxy_llava.models') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_accepts_defaults_and_names_the_bad_value():
    assert FinetuneArguments(method="lora", data="D").check().lora_r == 8
    with pytest.raises(UserError, match="invalid value for lora_r: 0"):
        FinetuneArguments(method="lora", data="D", lora_r=0).check()
    with pytest.raises(UserError, match="unknown lora_projector 'half'"):
        FinetuneArguments(method="lora", data="D", lora_projector="half").check()
    with pytest.raises(UserError, match="no data given"):
        FinetuneArguments(method="full").check()


def test_read_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning-rate: 1.0e-4\nmethod: lora\n")
    assert read_yaml(f) == {"learning_rate": 1e-4, "method": "lora"}
    with pytest.raises(UserError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
