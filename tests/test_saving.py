"""saving: a trained model saved into a RUN folder (plain peft / transformers files plus our
markers) and exported as a plain checkpoint with the LoRA merged."""

from __future__ import annotations

import json

import pytest
import torch

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.folders import read_marker, read_prompt, run_kind
from galaxy_llava.models.loading import load_for_inference, load_model
from galaxy_llava.saving import export_run, save_run_model

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
    import re

    from galaxy_llava.models.llava import LLAVA

    names = _weight_names(out)  # merged from a peft model, still llava-hf's names
    assert any(n.startswith("vision_tower.vision_model.") for n in names)
    assert all(re.match(LLAVA.checkpoint_keys, n) for n in names)


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
    out = export_run(run, tmp_path / "exported", license="mit")  # export --license
    assert (out / "model.safetensors").is_file() and read_prompt(out) == DEFAULT_PROMPT
    assert read_marker(out)["base_model"] == str(tiny_model_dir.resolve())
    assert read_marker(out)["saved_by"] == "export" and read_marker(run / "model")["saved_by"] == \
        "train"
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.license == "mit"


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


# ----------------------------------------------------------------- usable blind from the Hub

QUESTION = "Describe this galaxy."


def _noise_png(folder, seed, size=72):
    import numpy as np
    from PIL import Image

    path = folder / f"galaxy-{seed}.png"
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size + 8 * seed, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_every_weights_folder_carries_decoding_template_and_card(lora_run, tiny_model_dir,
                                                                 tmp_path):
    from huggingface_hub import ModelCard

    run = lora_run[0]
    model, processor = load_model(tiny_model_dir)
    full = save_run_model(model, processor, tmp_path / "full", base_model=str(tiny_model_dir))
    export = export_run(run, tmp_path / "export")
    for folder, library in ((run / "adapter", "peft"), (full, "transformers"),
                            (export, "transformers")):
        for name in ("generation_config.json", "chat_template.jinja", "README.md"):
            assert (folder / name).is_file(), (folder, name)
        card = (folder / "README.md").read_text()
        assert "More Information Needed" not in card and str(tiny_model_dir) not in card
        meta = ModelCard.load(folder / "README.md").data.to_dict()
        assert (meta["library_name"], meta["pipeline_tag"]) == (library, "image-text-to-text")
        assert "base_model" not in meta  # a local base model: no path of this machine
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["num_beams"], generation["max_new_tokens"]) == (3, 40)
        assert generation["eos_token_id"] == [processor.tokenizer.eos_token_id]
    assert read_marker(run / "adapter")["question"] == "What galaxy is this?"  # lora_run's


def test_generation_config_is_describes_decoding(lora_run, monkeypatch):
    """What describe passes to generate, the saved generation_config.json holds."""
    from transformers import GenerationConfig

    from galaxy_llava.generate import describe_images

    run, peft_model, processor, prompt = lora_run
    seen = {}

    class Stop(Exception):
        pass

    def spy(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(peft_model, "generate", spy)
    with pytest.raises(Stop):
        describe_images(peft_model, processor, [_noise_png_image()], prompt)
    saved = GenerationConfig.from_pretrained(run / "adapter")
    decoding = {k: v for k, v in seen.items() if not isinstance(v, torch.Tensor)}
    assert {"num_beams", "max_new_tokens", "eos_token_id", "pad_token_id"} <= set(decoding)
    for key, value in decoding.items():
        assert getattr(saved, key) == value, key
    for key in ("temperature", "top_k", "top_p"):
        assert getattr(saved, key) is None


def _noise_png_image(seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (72, 72, 3),
                                                                 dtype=np.uint8))


@pytest.fixture(scope="module")
def family_models():
    """``{family: (model, processor)}``: a tiny random model of each family, built once."""
    from galaxy_llava.toy.tiny import TINY_BUILDERS, build_family_in_memory

    return {f: build_family_in_memory(f) for f in TINY_BUILDERS}


def _saved_processor(folder, family):
    from transformers import AutoProcessor

    if family.name == "qwen2_vl":  # AutoProcessor needs torchvision for Qwen2-VL's video part
        return family.load_processor(str(folder))
    return AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("prompt_kind", ["default", "question", "foreign"])
@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "idefics3"])
def test_chat_template_gives_the_training_prompt_ids(family_models, family_name, prompt_kind,
                                                     tmp_path):
    """Plain apply_chat_template on a saved folder's processor, then the processor, gives exactly
    the ids the trainer trains on (models/encoding.py), and the whole conversation starts with
    the training example's ids (what TRL's SFT would train on)."""
    from galaxy_llava.models.encoding import PromptIds, encode_example
    from galaxy_llava.models.registry import family_for

    model, processor = family_models[family_name]
    family = family_for(model)
    before = processor.chat_template
    prompt = {"default": family.default_prompt(processor),
              "question": family.default_prompt(processor, 'Qué "galaxy" {{ is }} this?'),
              "foreign": f"Look: {family.image_placeholder} Galaxy type and features:"
              }[prompt_kind]
    folder = save_run_model(model, processor, tmp_path / "run", prompt=prompt)
    saved = _saved_processor(folder, family)
    question = read_marker(folder)["question"]
    image = _noise_png_image(1)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    text = saved.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert text == prompt
    want = PromptIds(processor, family, prompt)(family.image_inputs(processor, image))
    assert saved(text=text, images=[image], return_tensors="pt")["input_ids"][0].tolist() == want
    with_image = {**user, "content": [{"type": "image", "image": image}, user["content"][1]]}
    direct = saved.apply_chat_template([with_image], add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
    assert direct["input_ids"][0].tolist() == want
    caption = "This is an image of a spiral galaxy, with two arms."
    answer = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    whole = saved(text=saved.apply_chat_template([user, answer], tokenize=False), images=[image],
                  return_tensors="pt")["input_ids"][0].tolist()
    example = encode_example(processor, family, image, caption, prompt)["input_ids"].tolist()
    assert whole[:len(example)] == example
    assert processor.chat_template == before  # the caller's processor is left as it was


@pytest.mark.slow
def test_plain_transformers_generate_equals_describe_on_an_export(tiny_model_dir, teach,
                                                                  tmp_path):
    """The model card's transformers snippet (no decoding arguments) on an export gives exactly
    describe's text: here the captions a full fine-tune learnt, ended by EOS."""
    from galaxy_llava.generate import describe_paths
    from galaxy_llava.modelcard import usage_snippet

    images = [_noise_png(tmp_path, seed) for seed in range(3)]
    captions = ["This is an image of a spiral galaxy, with two arms.",
                "This is an image of an elliptical galaxy, nearly round in shape.",
                "This is an image of a spiral galaxy, with a central bar."]
    model, processor = load_model(tiny_model_dir)
    from galaxy_llava.records import load_image

    model = teach(model, processor, [(load_image(p), c) for p, c in zip(images, captions)])
    save_run_model(model, processor, tmp_path / "run", base_model=str(tiny_model_dir))
    out = export_run(tmp_path / "run", tmp_path / "export")
    want = [r["caption"] for r in describe_paths(out, images)]
    assert want == captions
    got = []
    for image in images:
        space = {}
        exec(usage_snippet("model", QUESTION, model=str(out), image=str(image)), space)
        got.append(space["text"])
    assert got == want


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_plain_peft_generate_equals_describe_on_an_adapter(lora_run, tiny_model_dir, tmp_path):
    """The card's peft snippet on RUN/adapter gives exactly describe's text on the run."""
    from galaxy_llava.generate import describe_paths
    from galaxy_llava.modelcard import usage_snippet

    run = lora_run[0]
    images = [_noise_png(tmp_path, seed) for seed in range(3)]
    want = [r["caption"] for r in describe_paths(run, images)]
    question = read_marker(run / "adapter")["question"]
    got = []
    for image in images:
        space = {}
        exec(usage_snippet("adapter", question, base=str(tiny_model_dir),
                           model=str(run / "adapter"), image=str(image)), space)
        got.append(space["text"])
    assert got == want and len(set(want)) > 1


# ----------------------------------------------------------------- the published layout

def _weight_names(folder):
    from safetensors import safe_open

    names = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names += list(f.keys())
    return names


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl", "idefics3"])
def test_exports_use_the_published_layout_and_load_back_exactly(family_models, family_name,
                                                                 tmp_path):
    """An export's weight names and processor files are those of the family's published Hub
    checkpoints (llava-hf: vision_tower.vision_model.*, which vLLM needs; Qwen2-VL: a
    video_preprocessor_config.json), and plain transformers loads it with identical logits."""
    import re

    from transformers import AutoModelForImageTextToText
    from galaxy_llava.models.encoding import PromptIds

    from galaxy_llava.models.registry import family_for

    model, processor = family_models[family_name]
    family = family_for(model)
    save_run_model(model, processor, tmp_path / "run", prompt=family.default_prompt(processor))
    out = export_run(tmp_path / "run", tmp_path / "export")
    names = _weight_names(out)
    assert names and all(re.match(family.checkpoint_keys, n) for n in names), \
        [n for n in names if not re.match(family.checkpoint_keys, n)][:5]
    files = {"config.json", "generation_config.json", "preprocessor_config.json",
             "processor_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "README.md"}
    if family_name == "qwen2_vl":
        files.add("video_preprocessor_config.json")
        video = json.loads((out / "video_preprocessor_config.json").read_text())
        image = processor.image_processor
        assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
        assert (video["patch_size"], video["merge_size"], video["temporal_patch_size"]) == (
            image.patch_size, image.merge_size, image.temporal_patch_size)
    assert files <= {p.name for p in out.iterdir()}, files - {p.name for p in out.iterdir()}
    # the image processor's own file holds what transformers 5 nests in processor_config.json
    nested = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert json.loads((out / "preprocessor_config.json").read_text()) == nested

    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    image = _noise_png_image(2)
    inputs = family.image_inputs(processor, image)
    ids = torch.tensor([PromptIds(processor, family, family.default_prompt(processor))(inputs)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs,
             **family.token_inputs(ids, processor)}
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model.eval()(**batch).logits)
    saved = _saved_processor(out, family)  # the published files give the same ids
    prompt = saved.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": read_marker(
            out)["question"]}]}], add_generation_prompt=True, tokenize=False)
    assert saved(text=prompt, images=[image], return_tensors="pt")["input_ids"].tolist() == \
        ids.tolist()
