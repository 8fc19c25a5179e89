"""models.encoding: exact labels (caption + EOS only), the natural prompt/caption boundary, no
truncation, prompt ids built once per image-token count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.config import DEFAULT_PROMPT
from galaxy_llava.errors import UserError
from galaxy_llava.models.encoding import IGNORE_INDEX, PromptIds, encode_example, encode_text
from galaxy_llava.models.llava import processor_image_tokens
from galaxy_llava.rules import rule_set

SHORTEST = "This is an image of a spiral galaxy."
LONGEST = ("This is an image of an elliptical galaxy, moderately elongated in shape, "
           "prominent bulge at its center, boxy bulge at its center, "
           "disturbed or merging with another galaxy.")
CAPTIONS = [SHORTEST, LONGEST, "This is an image of a star or artifact, not a galaxy.",
            "This is an image of a spiral galaxy, with a central bar, with many arms."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


def _image(seed: int = 0, size: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 9, 3), dtype=np.uint8))


def _answer(ex) -> torch.Tensor:
    return ex["input_ids"][ex["labels"] != IGNORE_INDEX]


def _prompt_ids(processor, family, prompt: str = DEFAULT_PROMPT) -> list[int]:
    """The prompt's ids for one image (LLaVA: a fixed image-token count)."""
    return family.prompt_ids(processor, prompt, processor_image_tokens(processor))


def _text(tok, family, prompt_ids, caption: str, max_length=None):
    """``encode_text`` with the family's answer and end ids for ``caption``."""
    return encode_text(tok, prompt_ids, family.answer_ids(tok, caption), family.end_ids(tok),
                       max_length=max_length)


# ----------------------------------------------------------------- one example


@pytest.mark.parametrize("caption", CAPTIONS)
def test_labels_are_exactly_caption_then_eos(processor, family, caption):
    tok = processor.tokenizer
    ex = encode_example(processor, family, _image(), caption)
    assert {k: v.dim() for k, v in ex.items()} == {"input_ids": 1, "labels": 1, "pixel_values": 4}
    assert ex["pixel_values"].shape[0] == 1  # one image, a leading image dim to concatenate on
    assert ex["input_ids"].shape == ex["labels"].shape
    answer = _answer(ex).tolist()
    assert answer[-1] == tok.eos_token_id  # DESIGN.md, defect 3: the model must learn to stop
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
    assert torch.allclose(ex["pixel_values"], enc.pixel_values)


def test_encode_example_takes_a_path_and_a_prompt(processor, family, tmp_path):
    path = tmp_path / "galaxy.png"
    _image(3).save(path)
    prompt = "USER: <image>\nWhat galaxy is this?\nASSISTANT:"
    from_path = encode_example(processor, family, path, SHORTEST, prompt=prompt)
    from_image = encode_example(processor, family, _image(3), SHORTEST, prompt=prompt)
    assert torch.equal(from_path["input_ids"], from_image["input_ids"])
    assert torch.allclose(from_path["pixel_values"], from_image["pixel_values"])
    n_prompt = int((from_path["labels"] == IGNORE_INDEX).sum())
    assert from_path["input_ids"][:n_prompt].tolist() == _prompt_ids(processor, family, prompt)
    default = encode_example(processor, family, path, SHORTEST)
    assert default["input_ids"].tolist() != from_path["input_ids"].tolist()
    with pytest.raises(UserError, match="not found"):
        encode_example(processor, family, tmp_path / "missing.png", SHORTEST)


def test_every_reachable_caption_round_trips(processor, family):
    tok = processor.tokenizer
    prompt_ids = _prompt_ids(processor, family)
    captions = {m.caption() for r in ("reference", "tree") for m in rule_set(r).reachable()}
    for caption in sorted(captions):
        ex = _text(tok, family, prompt_ids, caption)
        answer = _answer(ex).tolist()
        assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == caption
        assert ex["input_ids"][: len(prompt_ids)].tolist() == prompt_ids


def test_reference_masking_would_mask_the_first_caption_token(processor, family):
    """DESIGN.md, defect 4: masking by a separately tokenised prompt's length drops '▁This'."""
    tok, image = processor.tokenizer, _image()
    ref_prompt = DEFAULT_PROMPT + " "
    full = processor(text=ref_prompt + SHORTEST, images=image, return_tensors="pt").input_ids[0]
    prompt_len = processor(text=ref_prompt, images=image, return_tensors="pt").input_ids.shape[1]
    ref_labels = full.clone()
    ref_labels[:prompt_len] = IGNORE_INDEX
    ref_answer = full[ref_labels != IGNORE_INDEX].tolist()
    assert tok.decode(ref_answer) != SHORTEST  # the reference loses "This"
    assert full[-1] != tok.eos_token_id  # and never shows EOS (DESIGN.md, defect 3)
    ours = _answer(encode_example(processor, family, image, SHORTEST)).tolist()
    assert tok.decode(ours[:-1]) == SHORTEST and len(ours) == len(ref_answer) + 2


def test_answer_ids_are_the_caption_as_it_follows_the_prompt(processor, family):
    tok = processor.tokenizer
    ids = family.answer_ids(tok, "  " + SHORTEST + " ")
    assert tok.convert_ids_to_tokens(ids[0]) == "▁This" and tok.eos_token_id not in ids
    assert tok.decode(ids) == SHORTEST
    assert family.end_ids(tok) == [tok.eos_token_id]
    # An empty caption has no answer ids, and an example of it is refused.
    assert family.answer_ids(tok, " \n ") == []
    with pytest.raises(UserError, match="empty caption"):
        _text(tok, family, _prompt_ids(processor, family), " \n ")


def test_image_tokens_are_expanded_and_masked(processor, family):
    ex = encode_example(processor, family, _image(), SHORTEST)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    is_image = ex["input_ids"] == image_id
    assert int(is_image.sum()) == processor_image_tokens(processor) == 16
    assert (ex["labels"][is_image] == IGNORE_INDEX).all()
    assert ex["input_ids"][0] == processor.tokenizer.bos_token_id
    assert ex["labels"][0] == IGNORE_INDEX


def test_over_long_examples_are_errors_not_truncated(processor, family):
    tok = processor.tokenizer
    prompt_ids = _prompt_ids(processor, family)
    with pytest.raises(UserError, match="exceeds the limit of 40"):
        _text(tok, family, prompt_ids, LONGEST, max_length=40)
    with pytest.raises(UserError, match="empty caption"):
        _text(tok, family, prompt_ids, "  ")
    # Without max_length the tokenizer's own limit applies (512 for the tiny model): a prompt of
    # 576 image tokens (TinyLLaVA's) does not fit, and is refused rather than cut.
    image_id = tok.convert_tokens_to_ids("<image>")
    long_prompt = [tok.bos_token_id] + [image_id] * 576
    assert tok.model_max_length == 512
    total = len(long_prompt) + len(family.answer_ids(tok, SHORTEST)) + 1
    with pytest.raises(UserError, match=f"example of {total} tokens exceeds the limit of 512"):
        _text(tok, family, long_prompt, SHORTEST)
    ex = _text(tok, family, long_prompt, SHORTEST, max_length=1000)
    assert int((ex["input_ids"] == image_id).sum()) == 576
    assert tok.decode(_answer(ex)[:-1]) == SHORTEST


# ----------------------------------------------------------------- prompt ids per image-token count


class _CountingFamily:
    """The tiny model's family, with the image-token count read from the inputs' ``n`` and every
    ``prompt_ids`` call recorded."""

    def __init__(self, family):
        self.family, self.calls = family, []

    def num_image_tokens(self, processor, image_inputs: dict) -> int:
        return int(image_inputs["n"])

    def prompt_ids(self, processor, prompt: str, num_image_tokens: int) -> list[int]:
        self.calls.append(num_image_tokens)
        return self.family.prompt_ids(processor, prompt, num_image_tokens)


def test_prompt_ids_are_built_once_per_image_token_count(processor, family):
    counting = _CountingFamily(family)
    prompt_ids = PromptIds(processor, counting, DEFAULT_PROMPT)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    first = prompt_ids({"n": 16})
    assert first == family.prompt_ids(processor, DEFAULT_PROMPT, 16)
    assert prompt_ids({"n": 16}) is first and counting.calls == [16]  # cached, not rebuilt
    four = prompt_ids({"n": 4})
    assert counting.calls == [16, 4] and sum(i == image_id for i in four) == 4
    assert len(first) - len(four) == 12  # only the image tokens differ
    assert prompt_ids({"n": 4}) is four and prompt_ids({"n": 16}) is first
    assert counting.calls == [16, 4]
    # The real family: the count comes from the processor (fixed for LLaVA), whatever the image.
    real = PromptIds(processor, family, DEFAULT_PROMPT)
    ids = [real(family.image_inputs(processor, _image(i, size=40 + 30 * i))) for i in range(3)]
    assert ids[0] == ids[1] == ids[2] == _prompt_ids(processor, family)
    assert sum(i == image_id for i in ids[0]) == processor_image_tokens(processor)
    assert family.num_image_tokens(processor, family.image_inputs(processor, _image())) == 16


def test_encode_text_ends_with_every_end_id(processor, family):
    tok = processor.tokenizer
    prompt_ids, answer = _prompt_ids(processor, family), family.answer_ids(tok, SHORTEST)
    end = [tok.eos_token_id, tok.pad_token_id]
    ex = encode_text(tok, prompt_ids, answer, end)
    assert ex["input_ids"].tolist() == prompt_ids + answer + end
    assert ex["labels"].tolist() == [IGNORE_INDEX] * len(prompt_ids) + answer + end
