"""data: exact labels (caption + EOS only), collator padding, JSONL records and image loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.data import (
    IGNORE_INDEX,
    Collator,
    encode_example,
    encode_prompt,
    encode_text,
    load_image,
    load_records,
    num_image_tokens,
)
from galaxy_llava.errors import UserError
from galaxy_llava.modeling import DEFAULT_PROMPT, load_model
from galaxy_llava.morphology import reachable_morphologies

SHORTEST = "This is an image of a spiral galaxy."
LONGEST = ("This is an image of an elliptical galaxy, moderately elongated in shape, "
           "prominent bulge at its center, boxy bulge at its center, "
           "disturbed or merging with another galaxy.")
CAPTIONS = [SHORTEST, LONGEST, "This is an image of a star or artifact, not a galaxy.",
            "This is an image of a spiral galaxy, with a central bar, with many arms."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_model(tiny_model_dir)[1]


def _image(seed: int = 0, size: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 9, 3), dtype=np.uint8))


def _answer(ex) -> torch.Tensor:
    return ex["input_ids"][ex["labels"] != IGNORE_INDEX]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_labels_are_exactly_caption_then_eos(processor, caption):
    tok = processor.tokenizer
    ex = encode_example(processor, _image(), caption)
    assert {k: v.dim() for k, v in ex.items()} == {
        "input_ids": 1, "attention_mask": 1, "labels": 1, "pixel_values": 3}
    answer = _answer(ex).tolist()
    assert answer[-1] == tok.eos_token_id  # defect 3: the model must learn to stop
    assert tok.decode(answer[:-1]) == caption
    assert tok.convert_ids_to_tokens(answer[0]) == "▁This"
    # labels are the ids on the answer and -100 on one contiguous prompt prefix
    start = len(ex["labels"]) - len(answer)
    assert (ex["labels"][:start] == IGNORE_INDEX).all()
    assert ex["labels"][start:].tolist() == ex["input_ids"][start:].tolist()
    # the prompt part is what the processor itself produces for the prompt at inference time
    enc = processor(text=DEFAULT_PROMPT, images=_image(), return_tensors="pt")
    assert ex["input_ids"][:start].tolist() == enc.input_ids[0].tolist()
    # and the whole sequence is how the full text tokenises: the boundary is the natural one
    full = processor(text=DEFAULT_PROMPT + " " + caption, images=_image(), return_tensors="pt")
    assert ex["input_ids"][:-1].tolist() == full.input_ids[0].tolist()
    assert torch.allclose(ex["pixel_values"], enc.pixel_values[0])


def test_every_reachable_caption_round_trips(processor):
    tok = processor.tokenizer
    captions = {m.caption() for r in ("reference", "tree") for m in reachable_morphologies(r)}
    for caption in sorted(captions):
        ex = encode_text(tok, caption, DEFAULT_PROMPT, num_image_tokens(processor))
        answer = _answer(ex).tolist()
        assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == caption


def test_reference_masking_would_mask_the_first_caption_token(processor):
    """Defect 4: masking by a separately tokenised prompt's length drops '▁This'."""
    tok, image = processor.tokenizer, _image()
    ref_prompt = DEFAULT_PROMPT + " "
    full = processor(text=ref_prompt + SHORTEST, images=image, return_tensors="pt").input_ids[0]
    prompt_len = processor(text=ref_prompt, images=image, return_tensors="pt").input_ids.shape[1]
    ref_labels = full.clone()
    ref_labels[:prompt_len] = IGNORE_INDEX
    ref_answer = full[ref_labels != IGNORE_INDEX].tolist()
    assert tok.decode(ref_answer) != SHORTEST  # the reference loses "This"
    assert full[-1] != tok.eos_token_id  # and never shows EOS (defect 3)
    ours = _answer(encode_example(processor, image, SHORTEST)).tolist()
    assert tok.decode(ours[:-1]) == SHORTEST and len(ours) == len(ref_answer) + 2


def test_image_tokens_are_expanded_and_masked(processor):
    ex = encode_example(processor, _image(), SHORTEST)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    is_image = ex["input_ids"] == image_id
    assert int(is_image.sum()) == num_image_tokens(processor) == 16
    assert (ex["labels"][is_image] == IGNORE_INDEX).all()
    assert ex["input_ids"][0] == processor.tokenizer.bos_token_id
    assert ex["labels"][0] == IGNORE_INDEX


def test_over_long_examples_and_bad_prompts_are_errors(processor):
    tok = processor.tokenizer
    with pytest.raises(UserError, match="exceeds the limit"):
        encode_text(tok, LONGEST, DEFAULT_PROMPT, 16, max_length=40)
    with pytest.raises(UserError, match="exactly once"):
        encode_text(tok, SHORTEST, "Describe this galaxy.", 16)
    with pytest.raises(UserError, match="empty caption"):
        encode_text(tok, "  ", DEFAULT_PROMPT, 16)
    assert len(encode_prompt(tok, DEFAULT_PROMPT, 576)) > 576  # no truncation of image tokens


def test_collator_pads_ids_labels_and_mask(processor):
    pad = processor.tokenizer.pad_token_id
    short = encode_example(processor, _image(1), SHORTEST)
    long = encode_example(processor, _image(2), LONGEST)
    batch = Collator(pad)([short, long])
    n, m = len(short["input_ids"]), len(long["input_ids"])
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].shape == (2, m)
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert (batch["input_ids"][0, n:] == pad).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # defect 2: padding is not trained on
    assert (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["attention_mask"][0, :n] == 1).all()
    assert torch.equal(batch["labels"][0, :n], short["labels"])
    assert torch.equal(batch["input_ids"][1], long["input_ids"])
    left = Collator(pad, padding_side="left")([short, long])
    assert (left["input_ids"][0, : m - n] == pad).all()
    assert torch.equal(left["labels"][0, m - n:], short["labels"])


def test_collated_batch_trains(tiny_model_dir, processor):
    model, _ = load_model(tiny_model_dir)
    batch = Collator(processor.tokenizer.pad_token_id)(
        [encode_example(processor, _image(i), c) for i, c in enumerate(CAPTIONS)])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


# ----------------------------------------------------------------- records and images


def _write_dataset(folder, lines):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        _image().save(folder / "images" / f"{name}.jpg")
    (folder / "dataset.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_load_records_resolves_paths_and_splits(tmp_path):
    recs = [{"image": "images/a.jpg", "text": SHORTEST, "split": "train"},
            {"image": "images/b.jpg", "text": LONGEST, "split": "val"},
            {"image": "images/c.jpg", "text": SHORTEST, "split": "train"}]
    _write_dataset(tmp_path, recs)
    all_records = load_records(tmp_path)
    assert [r["text"] for r in all_records] == [SHORTEST, LONGEST, SHORTEST]
    assert all(r["image"] == str((tmp_path / "images" / n).resolve()) for r, n in
               zip(all_records, ("a.jpg", "b.jpg", "c.jpg"), strict=True))
    assert len(load_records(tmp_path / "dataset.jsonl", split="train")) == 2
    with pytest.raises(UserError, match="splits present: train, val"):
        load_records(tmp_path, split="test")


def test_load_records_errors(tmp_path):
    _write_dataset(tmp_path, [{"image": "images/a.jpg", "text": SHORTEST}, "", "{not json"])
    with pytest.raises(UserError, match=r"dataset\.jsonl:3: malformed JSON"):
        load_records(tmp_path)
    _write_dataset(tmp_path, [{"image": "images/missing.jpg", "text": SHORTEST}])
    with pytest.raises(UserError, match="images/missing.jpg"):
        load_records(tmp_path)
    _write_dataset(tmp_path, [{"image": "images/a.jpg"}])
    with pytest.raises(UserError, match=":1: a record needs"):
        load_records(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nowhere")


def test_load_image_errors(tmp_path, monkeypatch):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.jpg is not an image"):
        load_image(text)
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")
    path = tmp_path / "big.png"
    _image(size=64).save(path)
    assert load_image(path).mode == "RGB"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x73 px is over twice this
    with pytest.raises(UserError, match="decompression-bomb"):
        load_image(path)


def test_prepared_dataset_records(request):
    """Records of the shared prepared dataset (skipped until the prepare module exists)."""
    pytest.importorskip("galaxy_llava.prepare")
    prepared = request.getfixturevalue("prepared_dir")
    records = load_records(prepared, split="train")
    assert records and all(r["split"] == "train" for r in records)
    processor = load_model(request.getfixturevalue("tiny_model_dir"))[1]
    ex = encode_example(processor, records[0]["image"], records[0]["text"])
    assert processor.tokenizer.decode(_answer(ex)[:-1]) == records[0]["text"]
