"""generate: batched description that stops at EOS, generation settings, describe_paths I/O."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.generate import describe_images, describe_paths, expand_image_paths
from galaxy_llava.models.registry import family_for
from galaxy_llava.models.loading import load_model
from galaxy_llava.saving import save_run_model

SHORTEST = "This is an image of a spiral galaxy."
LONGEST = ("This is an image of an elliptical galaxy, moderately elongated in shape, "
           "prominent bulge at its center, boxy bulge at its center, "
           "disturbed or merging with another galaxy.")


pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(value: int) -> Image.Image:
    return Image.new("RGB", (64, 64), (value, value, value))


def _noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def overfit(tiny_model_dir, teach):
    """The tiny model trained to give SHORTEST for a black image and LONGEST for a white one.

    Its answers must stop at EOS: a model that had not learned EOS (DESIGN.md, defect 3) would
    run on."""
    model, processor = load_model(tiny_model_dir)
    return teach(model, processor, [(_flat(0), SHORTEST), (_flat(255), LONGEST)]), processor


def test_describe_stops_at_eos(overfit):
    model, processor = overfit
    images = [_flat(0), _flat(255), _flat(255), _flat(0), _flat(0)]
    want = [SHORTEST, LONGEST, LONGEST, SHORTEST, SHORTEST]
    assert describe_images(model, processor, images, DEFAULT_PROMPT, batch_size=2, num_beams=3,
                           max_new_tokens=60) == want
    assert describe_images(model, processor, images, DEFAULT_PROMPT, batch_size=16, num_beams=1,
                           max_new_tokens=60) == want


def test_no_tokens_after_eos_are_decoded(tiny_model_dir, monkeypatch):
    """Whatever generate returns after EOS is cut, and only the new tokens are decoded."""
    model, processor = load_model(tiny_model_dir)
    tok = processor.tokenizer
    words = tok("This is", add_special_tokens=False).input_ids
    tail = tok(" with two arms", add_special_tokens=False).input_ids

    def fake_generate(input_ids, **kwargs):
        new = torch.tensor([words + [tok.eos_token_id] + tail] * input_ids.shape[0])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    texts = describe_images(model, processor, [_noise(0), _noise(1)], DEFAULT_PROMPT)
    assert texts == ["This is"] * 2


def test_generation_settings_and_one_call_per_batch(tiny_model_dir, monkeypatch):
    model, processor = load_model(tiny_model_dir)
    calls = []
    real = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    texts = describe_images(model, processor, [_noise(i) for i in range(5)], DEFAULT_PROMPT,
                            batch_size=2, num_beams=2, max_new_tokens=4)
    assert len(texts) == 5 and len(calls) == 3
    assert [c["pixel_values"].shape[0] for c in calls] == [2, 2, 1]
    kw = calls[0]
    tok = processor.tokenizer
    family = family_for(model)
    assert kw["eos_token_id"] == family.end_ids(tok) == [tok.eos_token_id]
    assert kw["pad_token_id"] == tok.pad_token_id
    assert kw["no_repeat_ngram_size"] == 0 and kw["min_length"] == 0  # DESIGN.md, defect 6
    assert kw["repetition_penalty"] == 1.0 and kw["num_beams"] == 2 and kw["do_sample"] is False
    assert kw["input_ids"][0, 0] == tok.bos_token_id
    # the images' inputs, concatenated along dim 0; the prompt's ids for each image
    per_image = [family.image_inputs(processor, _noise(i)) for i in range(2)]
    settings = {"max_new_tokens", "num_beams", "do_sample", "eos_token_id", "pad_token_id",
                "no_repeat_ngram_size", "repetition_penalty", "min_length"}
    assert set(kw) == settings | {"input_ids", "attention_mask", "pixel_values"}
    assert torch.allclose(kw["pixel_values"], torch.cat([p["pixel_values"] for p in per_image]))
    n = family.num_image_tokens(processor, per_image[0])
    prompt_ids = family.prompt_ids(processor, DEFAULT_PROMPT, n)
    assert kw["input_ids"].tolist() == [prompt_ids] * 2 and kw["attention_mask"].all()


def test_default_prompt_is_the_familys(tiny_model_dir, monkeypatch):
    model, processor = load_model(tiny_model_dir)
    calls = []

    def fake_generate(input_ids, **kwargs):
        calls.append(input_ids)
        return torch.cat([input_ids, torch.tensor([[processor.tokenizer.eos_token_id]])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    other = "USER: <image>\nName this galaxy.\nASSISTANT:"
    for prompt in (None, family_for(model).default_prompt(processor), DEFAULT_PROMPT, other):
        assert describe_images(model, processor, [_noise(0)], prompt) == [""]
    assert family_for(model).default_prompt(processor) == DEFAULT_PROMPT
    assert torch.equal(calls[0], calls[1]) and torch.equal(calls[0], calls[2])
    assert not torch.equal(calls[0], calls[3])
    family = family_for(model)
    n = family.num_image_tokens(processor, family.image_inputs(processor, _noise(0)))
    assert calls[3][0].tolist() == family.prompt_ids(processor, other, n)


def test_batching_does_not_change_answers(tiny_model_dir):
    model, processor = load_model(tiny_model_dir)
    images = [_noise(i) for i in range(3)]
    one = describe_images(model, processor, images, DEFAULT_PROMPT, batch_size=1, num_beams=1,
                          max_new_tokens=6)
    three = describe_images(model, processor, images, DEFAULT_PROMPT, batch_size=3, num_beams=1,
                            max_new_tokens=6)
    assert one == three


# ----------------------------------------------------------------- describe_paths


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    _flat(0).save(folder / "b_black.png")
    _flat(255).save(folder / "a_white.JPG")
    (folder / "readme.txt").write_text("not an image")
    return folder


def test_expand_image_paths(image_folder, tmp_path):
    assert [p.name for p in expand_image_paths([image_folder])] == ["a_white.JPG", "b_black.png"]
    with pytest.raises(UserError, match="does not exist"):
        expand_image_paths([tmp_path / "missing.png"])
    with pytest.raises(UserError, match="no images"):
        expand_image_paths([tmp_path])


def test_describe_paths_uses_the_stored_prompt(overfit, image_folder, tmp_path, monkeypatch):
    model, processor = overfit
    run = tmp_path / "run"
    prompt = "USER: <image>\nName this galaxy.\nASSISTANT:"
    save_run_model(model, processor, run, prompt=prompt, base_model="tiny")
    seen = []
    import galaxy_llava.generate as gen

    real = gen.describe_images
    monkeypatch.setattr(gen, "describe_images", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    results = describe_paths(run, [image_folder], batch_size=4, num_beams=1, max_new_tokens=60)
    assert seen == [prompt]
    assert [r["image"] for r in results] == [str(image_folder / "a_white.JPG"),
                                             str(image_folder / "b_black.png")]
    assert all(isinstance(r["caption"], str) for r in results)
    json.dumps(results)


def test_describe_paths_warns_without_stored_prompt(tiny_model_dir, image_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "galaxy_llava.json").unlink()
    with pytest.warns(UserWarning, match="no prompt stored"):
        results = describe_paths(folder, [image_folder / "b_black.png"], num_beams=1,
                                 max_new_tokens=3)
    assert len(results) == 1


def test_describe_paths_errors(tiny_model_dir, image_folder, tmp_path):
    fake = tmp_path / "galaxy.jpg"
    fake.write_text("definitely not a JPEG")
    with pytest.raises(UserError, match="galaxy.jpg is not an image"):
        describe_paths(tiny_model_dir, [image_folder, fake])
    with pytest.raises(UserError, match="offline"):
        describe_paths("no-such-org/no-such-model", [image_folder])
    model, processor = load_model(tiny_model_dir)
    for bad in ({"batch_size": 0}, {"num_beams": 0}, {"max_new_tokens": 0}):
        with pytest.raises(UserError, match="must be at least 1"):
            describe_images(model, processor, [image_folder / "b_black.png"], **bad)
