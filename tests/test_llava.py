"""models.llava and the family registry (models.base): image-token counts, prompt ids, processor
fixing, module names for LoRA, the frozen encoder's features and the cached-features forward."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.base import ModelFamily, unwrap
from galaxy_llava.models.registry import family_for
from galaxy_llava.models.llava import LLAVA, LlavaFamily, processor_image_tokens
from galaxy_llava.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int = 0, size: int = 72) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _prompt_ids(family, processor, prompt: str, image=None) -> list[int]:
    """``prompt``'s ids with the image-token count the family gives for ``image``."""
    inputs = family.image_inputs(processor, image if image is not None else _image())
    return family.prompt_ids(processor, prompt, family.num_image_tokens(processor, inputs))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _tinyllava_vision_config(strategy: str = "default"):
    from transformers import CLIPVisionConfig, LlavaConfig

    return LlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                       vision_feature_select_strategy=strategy)


def _processor_like_tinyllava(processor):
    """A copy of the tiny processor cropping 336 px images into 14 px patches (576 tokens)."""
    proc = copy.deepcopy(processor)
    proc.patch_size = 14
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.image_processor.size = {"shortest_edge": 336}
    return proc


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny model in eval mode (module-shared: tests must not change it)."""
    return load_model(tiny_model_dir)[0].eval()


# ----------------------------------------------------------------- the registry


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_family_for_model_config_and_peft_wrapper(tiny_model, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    assert family_for(tiny_model) is LLAVA and family_for(tiny_model.config) is LLAVA
    assert isinstance(LLAVA, LlavaFamily) and isinstance(LLAVA, ModelFamily)
    assert LLAVA.name == "llava" and "llava" in LLAVA.model_types
    fresh = load_model(tiny_model_dir)[0]
    peft_model = get_peft_model(fresh, LoraConfig(r=2, target_modules=["linear_1"]))
    assert family_for(peft_model) is LLAVA
    assert unwrap(peft_model) is fresh and unwrap(tiny_model) is tiny_model


def test_unsupported_model_type_is_a_one_line_error():
    from transformers import CLIPVisionConfig, LlamaConfig

    from galaxy_llava.models.registry import FAMILIES

    supported = ", ".join(sorted(FAMILIES))  # every registered model type, llava among them
    assert "llava" in FAMILIES and FAMILIES["llava"] is LLAVA
    for config, kind in ((LlamaConfig(), "llama"), (CLIPVisionConfig(), "clip_vision_model")):
        with pytest.raises(UserError) as e:
            family_for(config)
        assert str(e.value) == f"unsupported model type '{kind}'; supported: {supported}"
    with pytest.raises(UserError) as e:
        family_for(object())
    assert str(e.value) == f"unsupported model type None; supported: {supported}"


# ----------------------------------------------------------------- image tokens and prompt


def test_image_token_counts_from_processor_and_config_agree(tiny_model, tiny_processor, family):
    n = family.image_token_count(tiny_model.config)
    assert n == processor_image_tokens(tiny_processor) == 16  # (64 / 16)^2, CLS dropped
    enc = tiny_processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert int((enc.input_ids == tiny_model.config.image_token_id).sum()) == n
    width = tiny_model.config.vision_config.hidden_size
    inputs = family.image_inputs(tiny_processor, _image())
    assert family.num_image_tokens(tiny_processor, inputs) == n
    assert family.vision_features(tiny_model, inputs).shape == (1, n, width)
    # TinyLLaVA's shapes: 336 px in 14 px patches
    assert family.image_token_count(_tinyllava_vision_config()) == 576
    assert family.image_token_count(_tinyllava_vision_config("full")) == 577  # CLS kept
    big = _processor_like_tinyllava(tiny_processor)
    assert processor_image_tokens(big) == 576
    assert family.num_image_tokens(big, family.image_inputs(big, _image(size=400))) == 576
    enc = big(text=DEFAULT_PROMPT, images=_image(size=400), return_tensors="pt")
    assert int((enc.input_ids == tiny_model.config.image_token_id).sum()) == 576
    big.vision_feature_select_strategy = "full"
    assert processor_image_tokens(big) == 577


def test_prompt_ids_are_the_processors_own(tiny_processor, family):
    tok = tiny_processor.tokenizer
    assert family.default_prompt(tiny_processor) == DEFAULT_PROMPT
    for prompt in (DEFAULT_PROMPT, "USER: <image>\nWhat galaxy is this?\nASSISTANT:"):
        ids = _prompt_ids(family, tiny_processor, prompt)
        enc = tiny_processor(text=prompt, images=_image(), return_tensors="pt")
        assert ids == enc.input_ids[0].tolist()
        assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    for bad in ("Describe this galaxy.", "USER: <image><image>\nDescribe.\nASSISTANT:"):
        with pytest.raises(UserError, match="exactly once"):
            family.prompt_ids(tiny_processor, bad, 16)


def test_prompt_ids_expand_the_placeholder_to_the_count_given(tiny_processor, family):
    tok = tiny_processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = {n: family.prompt_ids(tiny_processor, DEFAULT_PROMPT, n) for n in (1, 16, 40)}
    for n, got in ids.items():
        assert sum(i == image_id for i in got) == n
        assert len(got) == len(ids[1]) + n - 1  # only the image tokens differ
    assert ids[16] == _prompt_ids(family, tiny_processor, DEFAULT_PROMPT)


def test_prompt_ids_never_truncate_image_tokens(tiny_processor, family):
    tok = tiny_processor.tokenizer
    big = _processor_like_tinyllava(tiny_processor)
    ids = _prompt_ids(family, big, DEFAULT_PROMPT, _image(size=400))
    image_id = tok.convert_tokens_to_ids("<image>")
    assert sum(i == image_id for i in ids) == 576
    assert len(ids) > 576 > tok.model_max_length  # over the tokenizer's limit, yet complete
    assert ids[-1] != image_id and ids[0] == tok.bos_token_id


def test_image_inputs_of_one_image_concatenate_into_a_batch(tiny_processor, family):
    images = [_image(0), _image(1, size=90)]
    want = tiny_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    per_image = [family.image_inputs(tiny_processor, im) for im in images]
    for i, inputs in enumerate(per_image):
        assert set(inputs) == {"pixel_values"}
        assert inputs["pixel_values"].shape == (1, 3, 64, 64)
        assert torch.allclose(inputs["pixel_values"], want[i:i + 1])
    batch = torch.cat([p["pixel_values"] for p in per_image])
    assert batch.shape == (2, 3, 64, 64) and torch.allclose(batch, want)


# ----------------------------------------------------------------- fix_processor


def test_fix_processor_of_a_missing_patch_size(no_patch_model_dir, tiny_model, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(no_patch_model_dir)
    assert processor.patch_size is None
    with pytest.raises(UserError, match="no patch_size"):
        processor_image_tokens(processor)
    family.fix_processor(processor, tiny_model.config)
    assert processor.patch_size == 16
    assert processor_image_tokens(processor) == family.image_token_count(tiny_model.config) == 16
    enc = processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert int((enc.input_ids == tiny_model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(tiny_model(**enc).logits).all()


def test_fix_processor_repairs_the_cls_accounting_or_names_the_mismatch(tiny_processor, family,
                                                                         tiny_model):
    proc = copy.deepcopy(tiny_processor)
    proc.num_additional_image_tokens = 0  # "default" then drops a CLS that was never counted
    assert processor_image_tokens(proc) == 15
    family.fix_processor(proc, tiny_model.config)
    assert processor_image_tokens(proc) == 16
    assert proc.num_additional_image_tokens == 1
    assert proc.vision_feature_select_strategy == tiny_model.config.vision_feature_select_strategy
    wrong = copy.deepcopy(tiny_processor)
    wrong.image_processor.crop_size = {"height": 32, "width": 32}
    with pytest.raises(UserError, match="gives 4 image tokens per image but the model expects 16"):
        family.fix_processor(wrong, tiny_model.config)


# ----------------------------------------------------------------- where things are


def test_lora_targets_name_language_linears_and_projector_only(tiny_model, family):
    names = [n for n, _ in tiny_model.named_modules()]
    n_layers = tiny_model.config.text_config.num_hidden_layers
    language = {f"model.language_model.layers.{i}.{m}" for i in range(n_layers) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    projector = {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    for mode, want in (("lora", language | projector), ("full", language)):
        regex = family.lora_target_modules(mode)
        assert {n for n in names if re.fullmatch(regex, n)} == want
    assert any("vision_tower" in n and n.endswith("q_proj") for n in names)  # exist, never match
    assert family.vision_encoder(tiny_model) is tiny_model.model.vision_tower
    for name in family.projector_module_names() + family.unquantized_modules():
        assert any(n.split(".")[-1] == name for n in names), name


def test_vision_features_equal_the_towers_selected_layer(tiny_model, tiny_batch, family):
    pixels = tiny_batch["pixel_values"]
    feats = family.vision_features(tiny_model, {"pixel_values": pixels})
    with torch.no_grad():
        hidden = tiny_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    layer = tiny_model.config.vision_feature_layer
    assert layer == -2 and tiny_model.config.vision_feature_select_strategy == "default"
    want = hidden[layer][:, 1:]  # the selected layer, CLS dropped
    n = family.image_token_count(tiny_model.config)
    width = tiny_model.config.vision_config.hidden_size
    assert feats.shape == (2, n, width)
    assert torch.allclose(feats, want, atol=1e-6)
    assert not torch.allclose(feats, hidden[-1][:, 1:], atol=1e-3)  # not just any layer
    assert not feats.requires_grad
    assert not tiny_model.model.multi_modal_projector._forward_pre_hooks  # the hook is gone
    # split per image: one [1, tokens, width] row each, concatenating back to the batch's output
    rows = family.split_features(feats, {"pixel_values": pixels})
    assert [tuple(r.shape) for r in rows] == [(1, n, width)] * 2
    assert torch.equal(torch.cat(rows), feats)
    one = family.vision_features(tiny_model, {"pixel_values": pixels[1:]})
    assert torch.allclose(rows[1], one, atol=1e-6)


def test_cached_features_forward_equals_the_plain_forward(tiny_model_dir, tiny_batch, family):
    model = load_model(tiny_model_dir)[0].eval()
    inner = model.model
    plain = _logits(model, tiny_batch)
    feats = family.vision_features(model, {"pixel_values": tiny_batch["pixel_values"]})
    cached = dict(tiny_batch, pixel_values=feats)
    with family.cached_features(model) as patched:
        assert patched is model and "get_image_features" in vars(inner)
        got = _logits(model, cached)
    assert torch.allclose(got, plain, atol=1e-5)
    assert "get_image_features" not in vars(inner)  # the patch is removed after the context
    assert torch.allclose(_logits(model, tiny_batch), plain, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), family.cached_features(model):
        raise RuntimeError("boom")
    assert "get_image_features" not in vars(inner)  # removed on an error too


def test_cached_features_train_the_projector_inside_the_forward(tiny_model_dir, tiny_batch,
                                                                family):
    """The projector still runs inside forward on cached rows: the same gradients reach it."""
    model = load_model(tiny_model_dir)[0]
    projector = model.model.multi_modal_projector

    def projector_grads(batch):
        model.zero_grad()
        model(**batch).logits.float().pow(2).mean().backward()
        return [p.grad.clone() for p in projector.parameters()]

    plain = projector_grads(tiny_batch)
    feats = family.vision_features(model, {"pixel_values": tiny_batch["pixel_values"]})
    with family.cached_features(model):
        cached = projector_grads(dict(tiny_batch, pixel_values=feats))
    assert all(g.abs().sum() > 0 for g in plain)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, cached))
