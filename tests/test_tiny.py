"""tiny: the random-initialised tiny LLaVA and its TinyLLaVA-like tokenizer, reloadable with plain
transformers, deterministic for the seed; the tinyllava preset's shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.models.folders import read_prompt
from galaxy_llava.toy.tiny import tiny_config

CAPTION = "This is an image of a spiral galaxy, with two arms."


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int = 0, size: int = 72) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_tiny_model_reloads_with_plain_transformers(tiny_model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not list(tiny_model_dir.glob("*.bin"))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    enc = processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    total = sum(p.numel() for p in model.parameters())
    assert 200_000 < total < 5_000_000
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert read_prompt(tiny_model_dir) == DEFAULT_PROMPT


def test_tokenizer_behaves_like_tinyllava(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token == "<pad>" and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    image_ids = tok("<image>", add_special_tokens=False).input_ids
    assert len(image_ids) == 1 and tok.convert_ids_to_tokens(image_ids[0]) == "<image>"
    ids = tok(CAPTION).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1]) == "▁This"
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    # Words outside the caption grammar still round-trip (byte fallback).
    odd = "Quasar J0313-1806 émission, 42 zebras!"
    assert tok.decode(tok(odd, add_special_tokens=False).input_ids) == odd
    assert 400 < len(tok) <= 1000


def test_build_is_deterministic_for_the_seed(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from galaxy_llava.toy.tiny import build_tiny_model

    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tinyllava_preset_has_tinyllava_shapes():
    from transformers import LlavaForConditionalGeneration

    cfg = tiny_config("tinyllava")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.patch_size, v.image_size) == (1024, 24, 14, 336)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == (2048, 22, 32, 4, 5632, 32064)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    proj = model.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features) == \
        (1024, 2048, 2048)
    total = sum(p.numel() for p in model.parameters())
    assert 1.40e9 < total < 1.43e9  # TinyLLaVA: about 1.41 B


def test_every_registered_family_has_a_tiny_builder_or_a_stated_reason():
    """The family-parametrised tests run over TINY_BUILDERS: a family added to the registry
    without a tiny model, or a reason it needs none, would go untested without notice."""
    from galaxy_llava.models.registry import FAMILIES
    from galaxy_llava.toy.tiny import NO_TINY_BUILDER, TINY_BUILDERS

    registered = {family.name for family in FAMILIES.values()}
    assert not set(TINY_BUILDERS) & set(NO_TINY_BUILDER), "a family both built and excused"
    missing = registered - set(TINY_BUILDERS) - set(NO_TINY_BUILDER)
    assert not missing, (f"registered families without a tiny builder: {sorted(missing)}; add "
                         "one to toy.tiny.TINY_BUILDERS or say why not in NO_TINY_BUILDER")
    assert set(TINY_BUILDERS) | set(NO_TINY_BUILDER) <= registered  # no stale names
    assert all(len(reason.split()) >= 5 for reason in NO_TINY_BUILDER.values())
