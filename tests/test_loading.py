"""models.loading: device and dtype choice, configs, safe loading of model folders, RUN folders and
Hub ids, and one-line errors for what a user can fix."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.loading import (
    hub_error,
    load_adapter_model,
    load_config,
    load_for_inference,
    load_model,
    resolve_device,
    resolve_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed: int = 0, size: int = 72) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ----------------------------------------------------------------- device, dtype, config


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == want
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


def test_load_config_and_its_errors(tiny_model_dir, tmp_path):
    config = load_config(str(tiny_model_dir))
    assert config.model_type == "llava" and config.vision_config.patch_size == 16
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the model config") as e:
        load_config(str(tmp_path))
    assert "\n" not in str(e.value)


def test_hub_error_is_one_line_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = hub_error("org/model", OSError("first line\nsecond line"))
    assert isinstance(e, UserError) and "\n" not in str(e)
    assert "offline" in str(e) and "first line" in str(e) and "second" not in str(e)
    assert "hf download org/model" in str(e)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "could not be fetched" in str(hub_error("org/model", OSError("")))


# ----------------------------------------------------------------- model folders


def test_load_model_gives_fp32_sdpa_on_cpu(tiny_model_dir):
    model, processor = load_model(tiny_model_dir, device="cpu")
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).device.type == "cpu"
    assert load_model(tiny_model_dir, device="cpu", dtype="bf16")[0].dtype == torch.bfloat16


def test_load_model_fixes_missing_patch_size(no_patch_model_dir):
    model, processor = load_model(no_patch_model_dir)
    assert processor.patch_size == 16
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    enc = processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert int((enc.input_ids == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        model(**enc)


def test_unsupported_checkpoint_is_a_one_line_user_error(tiny_model_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    base.model.language_model.save_pretrained(tmp_path / "llama")
    base.model.vision_tower.save_pretrained(tmp_path / "clip")
    from galaxy_llava.models.registry import FAMILIES

    supported = ", ".join(sorted(FAMILIES))  # every registered model type, llava among them
    assert "llava" in FAMILIES
    for name, kind in (("llama", "llama"), ("clip", "clip_vision_model")):
        with pytest.raises(UserError, match=re.escape(f"unsupported model type '{kind}'; "
                                                      f"supported: {supported}")) as e:
            load_model(tmp_path / name)
        assert "\n" not in str(e.value)


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(tiny_model_dir, folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no .safetensors weights"):
        load_model(folder)


def test_offline_hub_id_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for fn in (load_model, load_for_inference):
        with pytest.raises(UserError, match="no local folder.*offline.*hf download "
                           "no-such-org/no-such-galaxy-model --local-dir") as e:
            fn("no-such-org/no-such-galaxy-model")
        assert "\n" not in str(e.value)


def test_folder_that_is_neither_run_nor_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a galaxy-llava run or model folder"):
        load_for_inference(tmp_path)
    with pytest.raises(UserError, match="not a galaxy-llava run or model folder"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_for_inference(tmp_path / "missing")


def test_load_for_inference_of_a_model_folder(tiny_model_dir, tmp_path, tiny_batch, monkeypatch):
    model, processor, prompt = load_for_inference(tiny_model_dir)
    assert prompt == DEFAULT_PROMPT and not model.training
    assert processor.patch_size == 16
    reference = load_model(tiny_model_dir)[0].eval()
    assert torch.equal(_logits(model, tiny_batch), _logits(reference, tiny_batch))
    folder = tmp_path / "no-prompt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "galaxy_llava.json").unlink()
    with pytest.warns(UserWarning, match="no prompt stored"):
        assert load_for_inference(folder)[2] == DEFAULT_PROMPT
    # without a stored prompt, the model family's default is used (and named in the warning)
    from galaxy_llava.models.llava import LlavaFamily

    other = "USER: <image>\nWhich galaxy?\nASSISTANT:"
    monkeypatch.setattr(LlavaFamily, "default_prompt", lambda self, processor, *a, **k: other)
    with pytest.warns(UserWarning, match="Which galaxy"):
        assert load_for_inference(folder)[2] == other
    assert load_for_inference(tiny_model_dir)[2] == DEFAULT_PROMPT  # a stored prompt wins


# ----------------------------------------------------------------- RUN folders


def test_load_for_inference_of_a_lora_run(lora_run, tiny_batch):
    run, peft_model, processor, prompt = lora_run
    model, proc, got_prompt = load_for_inference(run)
    assert got_prompt == prompt and not model.training
    assert type(model).__name__ == "LlavaForConditionalGeneration"  # merged, not a peft wrapper
    assert torch.allclose(_logits(model, tiny_batch), _logits(peft_model, tiny_batch), atol=1e-4)


def test_load_model_accepts_a_run_folder(lora_run, tiny_batch):
    run, peft_model, processor, prompt = lora_run
    model, proc = load_model(run)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert torch.allclose(_logits(model.eval(), tiny_batch), _logits(peft_model, tiny_batch),
                          atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_load_adapter_model_unmerged(lora_run, tiny_batch):
    from peft import PeftModel

    run, peft_model, processor, prompt = lora_run
    model, proc = load_adapter_model(run, merge=False)
    assert isinstance(model, PeftModel)
    assert torch.allclose(_logits(model.eval(), tiny_batch), _logits(peft_model, tiny_batch),
                          atol=1e-5)


def test_missing_base_model_of_adapter(moved_lora_run):
    with pytest.raises(UserError, match="base model.*was not found"):
        load_for_inference(moved_lora_run)
    with pytest.raises(UserError, match="base model.*was not found"):
        load_model(moved_lora_run)


def test_adapter_loads_only_as_safetensors(lora_run, tmp_path):
    run = tmp_path / "pickled-run"
    shutil.copytree(lora_run[0], run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(b"a pickle would be loaded here")
    with pytest.raises(UserError, match="no adapter_model.safetensors"):
        load_for_inference(run)
