"""Every model family (LLaVA, Qwen2-VL, Idefics3) through the same product code: exact labels,
cached == uncached loss and gradients, LoRA that lowers the loss and covers the connector but
never the encoder, an adapter plain peft reloads, and answers that stop at the end token."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.toy.tiny import TINY_BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = "This is an image of a spiral galaxy."
LONG = "This is an image of an elliptical galaxy, nearly round in shape."


@pytest.fixture(scope="module", params=list(TINY_BUILDERS))
def family_dir(request, tmp_path_factory):
    """(family name, a tiny random-initialised model folder of it)."""
    from galaxy_llava.toy.tiny import build_tiny_model

    out = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, build_tiny_model(out, family=request.param, seed=0)


def _load(folder):
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.models.registry import family_for

    model, processor = load_model(folder, device="cpu", dtype=torch.float32)
    return model, processor, family_for(model)


def _flat(value: int) -> Image.Image:
    return Image.fromarray(np.full((64, 64, 3), value, dtype=np.uint8))


def _model_inputs(model, processor, image, caption, prompt):
    """One example as the model's forward takes it (no labels)."""
    from galaxy_llava.models.encoding import encode_example
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.training.batches import Collator

    family = family_for(model)
    batch = Collator(processor.tokenizer.pad_token_id, family=family, processor=processor)(
        [encode_example(processor, family, image, caption, prompt=prompt)])
    return {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}


def test_family_is_chosen_from_the_checkpoint(family_dir):
    name, folder = family_dir
    model, _, family = _load(folder)
    assert family.name == name and model.config.model_type in family.model_types


def test_labels_are_the_caption_then_the_families_end_token(family_dir):
    from galaxy_llava.models.encoding import encode_example

    _, folder = family_dir
    _, processor, family = _load(folder)
    tok = processor.tokenizer
    ex = encode_example(processor, family, _flat(128), LONG)
    labels = ex["labels"][ex["labels"] != -100].tolist()
    assert labels[-len(family.end_ids(tok)):] == family.end_ids(tok)
    assert tok.decode(labels[:-len(family.end_ids(tok))]).strip() == LONG
    n_prompt = int((ex["labels"] == -100).sum())
    assert ex["input_ids"][n_prompt:].tolist() == labels  # the answer follows the prompt exactly
    image_id = processor.tokenizer.convert_tokens_to_ids(
        {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>"}[family.name])
    # The prompt holds exactly the image tokens the family's own processor writes.
    reference = processor(images=[_flat(128)], text=[family.default_prompt(processor)],
                          return_tensors="pt")["input_ids"][0]
    assert ex["input_ids"][:n_prompt].tolist() == reference.tolist()
    assert int((ex["input_ids"] == image_id).sum()) == int((reference == image_id).sum()) > 0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cached_and_label_only_losses_equal_the_plain_forward(family_dir, method,
                                                             make_trainable):
    """The trainer's loss with cached encoder features and the label-only lm_head equals the
    plain HF forward's loss (pixels, full logits, HF's loss), gradient for gradient."""
    from types import SimpleNamespace

    from galaxy_llava.models.encoding import encode_example
    from galaxy_llava.training.batches import Collator
    from galaxy_llava.training.feature_cache import FeatureStore
    from galaxy_llava.training.trainer import GalaxyTrainer

    from galaxy_llava.models.registry import family_for

    _, folder = family_dir
    torch.manual_seed(0)
    model, processor = make_trainable(folder, method)
    family = family_for(model)
    images = [_flat(0), _flat(90), _flat(255)]
    items = [encode_example(processor, family, im, cap)
             for im, cap in zip(images, [SHORT, LONG, SHORT])]
    collate = Collator(processor.tokenizer.pad_token_id, family=family, processor=processor)
    batch = collate(items)
    assert batch["attention_mask"].min() == 0  # padding is exercised
    image_keys = [k for k in items[0] if k not in ("input_ids", "labels")]
    pixels = {k: torch.cat([it[k] for it in items]) for k in image_keys}
    rows = family.split_features(family.vision_features(model, pixels), pixels)
    store = FeatureStore(torch.stack(rows), torch.float32,
                         [{k: it[k] for k in image_keys if k != "pixel_values"} for it in items])
    cached = collate([{"input_ids": it["input_ids"], "labels": it["labels"], **store.inputs(i)}
                      for i, it in enumerate(items)])

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad and p.grad is not None}

    plain = {k: v for k, v in batch.items() if k != "label_mask"}
    ref_loss, ref_grads = loss_and_grads(lambda: model(**plain).loss)
    me = SimpleNamespace(label_only_loss=True,
                         args=SimpleNamespace(average_tokens_across_devices=True, world_size=1))
    with family.cached_features(model):
        loss, grads = loss_and_grads(lambda: GalaxyTrainer.compute_loss(me, model, cached))
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-6), n


@pytest.fixture(scope="module")
def trained(family_dir, prepared_dir, tmp_path_factory):
    """A LoRA run and a full run of the family on the prepared galaxies."""
    from galaxy_llava.training.trainer import train

    name, folder = family_dir
    out = tmp_path_factory.mktemp(f"{name}-runs")
    kw = dict(learning_rate=3e-3, per_device_train_batch_size=4, logging_steps=1,
              num_train_epochs=8, save_strategy="no")
    return {m: (out / m, train(str(folder), prepared_dir, m, out / m, **kw))
            for m in ("lora", "full")}


@pytest.mark.slow
def test_training_lowers_loss_and_never_touches_the_encoder(family_dir, trained):
    from safetensors.torch import load_file

    _, folder = family_dir
    model, _, family = _load(folder)
    encoder = {n for n, p in model.named_parameters()
               if any(p is q for q in family.encoder_parameters(model))}
    assert encoder
    base = dict(model.named_parameters())
    for method, (run, metrics) in trained.items():
        log = [json.loads(x) for x in (run / "loss_log.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in log if e["split"] == "train"]
        assert metrics["steps"] >= 24 and sum(losses[-3:]) < 0.85 * sum(losses[:3]), method
    tuned = dict(_load(trained["full"][0] / "model")[0].named_parameters())
    assert all(torch.equal(tuned[n], base[n]) for n in encoder)
    assert any(not torch.equal(tuned[n], base[n]) for n in base if n not in encoder)
    cfg = json.loads((trained["lora"][0] / "adapter" / "adapter_config.json").read_text())
    lora = load_file(trained["lora"][0] / "adapter" / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in lora}
    assert not any(a + ".weight" in encoder for a in adapted)  # never the encoder
    connector = family.projector_module_names()[0]
    assert any(connector in a for a in adapted), cfg["target_modules"]  # the connector is adapted


@pytest.mark.slow
def test_adapter_reloads_with_plain_peft_and_gives_the_same_logits(family_dir, trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from galaxy_llava.models.loading import load_for_inference

    _, folder = family_dir
    run = trained["lora"][0]
    ours, processor, prompt = load_for_inference(run)
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder),
                                      run / "adapter").eval()
    batch = _model_inputs(ours, processor, _flat(60), SHORT, prompt)
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, plain(**batch).logits, atol=1e-5)


@pytest.mark.slow
def test_description_stops_at_the_end_token(family_dir, teach):
    """A model taught two captions answers each exactly, ending at the family's end token
    (a model that had not learned to stop would run on to max_new_tokens)."""
    from galaxy_llava.generate import describe_images

    _, folder = family_dir
    model, processor, _ = _load(folder)
    model = teach(model, processor, [(_flat(0), SHORT), (_flat(255), LONG)])
    texts = describe_images(model, processor, [_flat(0), _flat(255)], max_new_tokens=60,
                            progress=False)
    assert texts == [SHORT, LONG]


def test_an_unsupported_model_type_is_one_line_naming_the_supported(tmp_path):
    from galaxy_llava.models.registry import FAMILIES, family_for

    assert {"llava", "qwen2_vl", "idefics3"} <= set(FAMILIES)
    config = type("C", (), {"model_type": "gemma3"})()
    with pytest.raises(UserError, match=r"unsupported model type 'gemma3'; supported: " +
                       ", ".join(sorted(FAMILIES)) + "$"):
        family_for(config)


@pytest.mark.slow
def test_export_merges_into_a_plain_checkpoint_with_the_same_answers(family_dir, trained,
                                                                      tmp_path):
    from transformers import AutoModelForImageTextToText

    from galaxy_llava.models.loading import load_for_inference
    from galaxy_llava.saving import export_run

    run = trained["lora"][0]
    out = export_run(run, tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    ours, processor, prompt = load_for_inference(run)
    batch = _model_inputs(ours, processor, _flat(200), LONG, prompt)
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, plain(**batch).logits, atol=1e-5)
