"""modeling: tiny model, tokenizer, loading errors, LoRA targets, adapter/export round trips."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.modeling import (
    DEFAULT_PROMPT,
    apply_lora,
    count_parameters,
    export_run,
    load_for_inference,
    load_model,
    read_prompt,
    save_run_model,
    write_prompt,
)
from galaxy_llava.tiny import tiny_config

CAPTION = "This is an image of a spiral galaxy, with two arms."


pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int = 0, size: int = 72) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _inputs(processor, n: int = 2):
    from galaxy_llava.data import Collator, encode_example

    exs = [encode_example(processor, _image(i), CAPTION) for i in range(n)]
    batch = Collator(processor.tokenizer.pad_token_id)(exs)
    batch.pop("labels")
    return batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ----------------------------------------------------------------- tiny model and tokenizer


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

    from galaxy_llava.tiny import build_tiny_model

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


# ----------------------------------------------------------------- loading


def test_load_model_fixes_missing_patch_size(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-patch"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy"):
        cfg.pop(key)  # as TinyLLaVA ships it
    cfg_path.write_text(json.dumps(cfg))
    model, processor = load_model(folder)
    assert processor.patch_size == 16
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    enc = processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        model(**enc)


def test_non_llava_checkpoint_is_a_user_error(tiny_model_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    base.model.language_model.save_pretrained(tmp_path / "llama")
    base.model.vision_tower.save_pretrained(tmp_path / "clip")
    for name, kind in (("llama", "llama"), ("clip", "clip_vision_model")):
        with pytest.raises(UserError, match=f"'{kind}' checkpoint, not a LLaVA model") as e:
            load_model(tmp_path / name)
        assert "\n" not in str(e.value)


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(tiny_model_dir, folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        load_model(folder)


def test_offline_hub_id_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fn in (load_model, load_for_inference):
        with pytest.raises(UserError, match="offline.*local folder") as e:
            fn("no-such-org/no-such-galaxy-model")
        assert "\n" not in str(e.value)


def test_folder_that_is_neither_run_nor_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a galaxy-llava run or LLaVA model"):
        load_for_inference(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_for_inference(tmp_path / "missing")


def test_prompt_storage(tmp_path):
    assert read_prompt(tmp_path) is None
    write_prompt(tmp_path, "USER: <image>\nHi\nASSISTANT:", kind="model", base_model="x")
    assert read_prompt(tmp_path) == "USER: <image>\nHi\nASSISTANT:"
    data = json.loads((tmp_path / "galaxy_llava.json").read_text())
    assert data == {"prompt": "USER: <image>\nHi\nASSISTANT:", "kind": "model", "base_model": "x"}


# ----------------------------------------------------------------- LoRA


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


def test_lora_full_projector_option(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    peft_model = apply_lora(model, projector="full")
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n and "lora_" not in n for n in names)
    assert not any("multi_modal_projector" in n and "lora_" in n for n in names)


def test_lora_on_tinyllava_shapes_matches_the_notebook_count():
    """At r=16 the decoder's q/k/v/o/gate/up/down adapters are the notebook's printed 12,615,680;
    the projector adds its own (the reference's ``mm_projector`` target added nothing)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):  # shapes only: no 5.6 GB of weights
        model = LlavaForConditionalGeneration(tiny_config("tinyllava"))
        peft_model = apply_lora(model, r=16)
    projector = 16 * (1024 + 2048) + 16 * (2048 + 2048)
    assert count_parameters(peft_model)[0] == 12_615_680 + projector


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A RUN folder holding a LoRA adapter with non-zero weights, and that peft model."""
    model, processor = load_model(tiny_model_dir)
    peft_model = apply_lora(model)
    torch.manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("runs") / "lora"
    prompt = "USER: <image>\nWhat galaxy is this?\nASSISTANT:"
    save_run_model(peft_model, processor, run, prompt=prompt, base_model=str(tiny_model_dir))
    return run, peft_model.eval(), processor, prompt


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_reloads_with_plain_peft(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    run, peft_model, processor, prompt = lora_run
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "processor_config.json").is_file()
    assert json.loads((run / "galaxy_llava.json").read_text())["kind"] == "run"
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    batch = _inputs(processor)
    base_logits = _logits(base, batch)
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    got = _logits(reloaded, batch)
    assert torch.allclose(got, _logits(peft_model, batch), atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)


def test_export_merges_adapter(lora_run, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run, peft_model, processor, prompt = lora_run
    out = export_run(run, tmp_path / "exported")
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    assert AutoProcessor.from_pretrained(out) is not None
    batch = _inputs(processor)
    assert torch.allclose(_logits(merged, batch), _logits(peft_model, batch), atol=1e-4)
    assert read_prompt(out) == prompt
    assert not list(out.glob("adapter*"))


def test_load_for_inference_of_a_lora_run(lora_run):
    run, peft_model, processor, prompt = lora_run
    model, proc, got_prompt = load_for_inference(run)
    assert got_prompt == prompt and not model.training
    batch = _inputs(proc)
    assert torch.allclose(_logits(model, batch), _logits(peft_model, batch), atol=1e-4)


def test_load_model_accepts_a_run_folder(lora_run):
    run, peft_model, processor, prompt = lora_run
    model, proc = load_model(run)
    batch = _inputs(proc)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert torch.allclose(_logits(model.eval(), batch), _logits(peft_model, batch), atol=1e-4)


def test_missing_base_model_of_adapter(lora_run, tiny_model_dir, tmp_path):
    run = tmp_path / "moved-run"
    shutil.copytree(lora_run[0], run)
    for marker in (run / "galaxy_llava.json", run / "adapter" / "galaxy_llava.json"):
        data = json.loads(marker.read_text())
        data["base_model"] = str(tmp_path / "deleted-base")
        marker.write_text(json.dumps(data))
    with pytest.raises(UserError, match="base model.*was not found"):
        load_for_inference(run)
    with pytest.raises(UserError, match="base model.*was not found"):
        export_run(run, tmp_path / "out")


def test_adapter_loads_only_as_safetensors(lora_run, tmp_path):
    run = tmp_path / "pickled-run"
    shutil.copytree(lora_run[0], run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(b"a pickle would be loaded here")
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        load_for_inference(run)


def test_full_run_save_load_and_export(tiny_model_dir, tmp_path):
    model, processor = load_model(tiny_model_dir)
    run = tmp_path / "full"
    save_run_model(model, processor, run, prompt=DEFAULT_PROMPT, base_model=str(tiny_model_dir))
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    loaded, proc, prompt = load_for_inference(run)
    batch = _inputs(proc)
    assert prompt == DEFAULT_PROMPT
    assert torch.allclose(_logits(loaded, batch), _logits(model.eval(), batch), atol=1e-6)
    again = load_model(run)[0].eval()
    assert torch.allclose(_logits(again, batch), _logits(model, batch), atol=1e-6)
    out = export_run(run, tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and read_prompt(out) == DEFAULT_PROMPT
