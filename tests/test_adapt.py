"""models.adapt: which parameters train (LoRA targets, the projector's two modes, the frozen vision
encoder), parameter counts and QLoRA's one-line errors."""

from __future__ import annotations

import pytest
import torch

from galaxy_llava.errors import UserError
from galaxy_llava.models.adapt import (
    apply_lora,
    count_parameters,
    freeze_vision_encoder,
    qlora_config,
)
from galaxy_llava.models.loading import load_model
from galaxy_llava.toy.tiny import tiny_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]


def test_lora_targets_projector_and_language_model_not_vision(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    n_layers = model.config.text_config.num_hidden_layers
    peft_model = apply_lora(model, r=4, alpha=8)
    lora = {n.split(".lora_A")[0].replace("base_model.model.", "")
            for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    expected = {f"model.language_model.layers.{i}.{m}" for i in range(n_layers) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    expected |= {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    assert lora == expected
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    # r * (in + out) per adapted linear
    linears = dict(peft_model.named_modules())
    want = sum(4 * (linears["base_model.model." + m].in_features
                    + linears["base_model.model." + m].out_features) for m in expected)
    assert count_parameters(peft_model)[0] == want
    assert peft_model.peft_config["default"].lora_alpha == 8


def test_lora_full_projector_option(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    peft_model = apply_lora(model, projector="full")
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n and "lora_" not in n for n in names)
    assert not any("multi_modal_projector" in n and "lora_" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    assert any("language_model" in n and "lora_" in n for n in names)


def test_lora_target_override_and_bad_projector(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(UserError, match="projector must be one of lora, full"):
        apply_lora(model, projector="half")
    peft_model = apply_lora(model, target_modules=r".*language_model\.layers\.0\.self_attn\.q_proj")
    lora = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert lora == {"base_model.model.model.language_model.layers.0.self_attn.q_proj"}


def test_lora_on_tinyllava_shapes_matches_the_notebook_count():
    """At r=16 the decoder's q/k/v/o/gate/up/down adapters are the notebook's printed 12,615,680;
    the projector adds its own (the reference's ``mm_projector`` target added nothing)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # shapes only: no 5.6 GB of weights
        model = LlavaForConditionalGeneration(tiny_config("tinyllava"))
        peft_model = apply_lora(model, r=16)
    projector = 16 * (1024 + 2048) + 16 * (2048 + 2048)
    assert count_parameters(peft_model)[0] == 12_615_680 + projector


def test_freeze_vision_encoder_and_count_parameters(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    freeze_vision_encoder(model)
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert tower > 0 and count_parameters(model) == (total - tower, total)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if ".vision_tower." in f".{n}"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_qlora_without_a_gpu_is_a_one_line_error(family):
    with pytest.raises(UserError, match="needs a CUDA GPU") as e:
        qlora_config(family)
    assert "\n" not in str(e.value)
