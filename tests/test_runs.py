"""models.runs: a trained model saved into a RUN folder (plain peft / transformers files plus our
markers) and exported as a plain checkpoint with the LoRA merged."""

from __future__ import annotations

import json

import pytest
import torch

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.folders import read_marker, read_prompt, run_kind
from galaxy_llava.models.loading import load_for_inference, load_model
from galaxy_llava.models.runs import export_run, save_run_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_adapter_reloads_with_plain_peft(lora_run, tiny_model_dir, tiny_batch):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    run, peft_model, processor, prompt = lora_run
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "processor_config.json").is_file()
    assert not (run / "model").exists() and run_kind(run) == "adapter"
    marker = json.loads((run / "galaxy_llava.json").read_text())
    assert marker == {"kind": "run", "prompt": prompt, "base_model": str(tiny_model_dir.resolve()),
                      "method": "lora"}
    assert read_marker(run / "adapter")["kind"] == "adapter" and read_prompt(run) == prompt
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, tiny_batch)
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    got = _logits(reloaded, tiny_batch)
    assert torch.allclose(got, _logits(peft_model, tiny_batch), atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)


def test_export_merges_adapter(lora_run, tmp_path, tiny_batch):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run, peft_model, processor, prompt = lora_run
    out = export_run(run, tmp_path / "exported")
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    assert AutoProcessor.from_pretrained(out) is not None
    assert torch.allclose(_logits(merged, tiny_batch), _logits(peft_model, tiny_batch), atol=1e-4)
    assert read_prompt(out) == prompt
    assert read_marker(out)["kind"] == "model" and run_kind(out) == "model"
    assert not list(out.glob("adapter*"))
    assert merged.dtype == torch.float32  # the base checkpoint's dtype


def test_full_run_save_load_and_export(tiny_model_dir, tmp_path, tiny_batch):
    model, processor = load_model(tiny_model_dir)
    run = tmp_path / "full"
    save_run_model(model, processor, run, prompt=DEFAULT_PROMPT, base_model=str(tiny_model_dir))
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert run_kind(run) == "full" and read_marker(run)["method"] == "full"
    loaded, proc, prompt = load_for_inference(run)
    assert prompt == DEFAULT_PROMPT
    assert torch.allclose(_logits(loaded, tiny_batch), _logits(model.eval(), tiny_batch), atol=1e-6)
    again = load_model(run)[0].eval()
    assert torch.allclose(_logits(again, tiny_batch), _logits(model, tiny_batch), atol=1e-6)
    out = export_run(run, tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and read_prompt(out) == DEFAULT_PROMPT
    assert read_marker(out)["base_model"] == str(tiny_model_dir.resolve())


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_saving_one_kind_removes_the_other(lora_run, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    model, processor = load_model(tiny_model_dir)
    save_run_model(model, processor, run, base_model=str(tiny_model_dir))
    assert run_kind(run) == "full"
    save_run_model(lora_run[1], processor, run, base_model=str(tiny_model_dir))
    assert run_kind(run) == "adapter" and not (run / "model").exists()
    assert read_marker(run)["method"] == "lora"


def test_export_of_something_that_is_not_a_run(tiny_model_dir, tmp_path):
    for bad in (tmp_path / "missing", tmp_path, tiny_model_dir):
        with pytest.raises(UserError, match="is not a galaxy-llava run"):
            export_run(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_with_a_missing_base_model(moved_lora_run, tmp_path):
    with pytest.raises(UserError, match="base model.*was not found"):
        export_run(moved_lora_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
