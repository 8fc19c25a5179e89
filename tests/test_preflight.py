"""models.preflight: a model folder's config, model type and weights, and the generation
ceiling, checked before any model loads and without importing torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import loaded_by

from galaxy_llava.errors import UserError
from galaxy_llava.models import preflight


def test_preflight_imports_no_torch():
    """The checks run before a model loads: importing them must not cost torch's import."""
    assert loaded_by("galaxy_llava.models.preflight", ("torch", "transformers")) == []


def test_preflight_and_generation_ceiling(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "tiny_llava"}))
    with pytest.raises(UserError, match="unsupported model type 'tiny_llava'.*supported: .*llava"):
        preflight.preflight_model(model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not a readable JSON model config"):
        preflight.preflight_model(model)
    config = {"model_type": "llava", "image_seq_length": 16,
              "text_config": {"max_position_embeddings": 512}}
    (model / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros(4, np.float32)}, str(model / "model.safetensors"))
    assert preflight.preflight_model(model) == config
    assert preflight.generation_ceiling(config) == (495, 512)
    preflight.check_generation(model, 1, 1, 495)
    with pytest.raises(UserError, match="--max-new-tokens 496 is more than .* at most 495"):
        preflight.check_generation(model, 1, 1, 496)
    with pytest.raises(UserError, match="--batch-size must be >= 1"):
        preflight.check_generation(model, 0, 1, 4)
    assert preflight.preflight_model(tmp_path / "missing") is None


def test_preflight_refuses_truncated_weights(tmp_path):
    """Weights cut short (a copy interrupted) are refused before the model loads."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    weights = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(64, np.float32)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
        preflight.preflight_model(tmp_path)


def test_ceiling_without_a_stated_context():
    assert preflight.generation_ceiling({}) == (preflight.DEFAULT_CONTEXT - 1,
                                               preflight.DEFAULT_CONTEXT)
