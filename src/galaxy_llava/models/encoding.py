"""Encoding one example for a model: the prompt's ids (per image-token count), the answer's ids
as they follow the prompt at generation time, the family's end token, and labels that are the
answer's and end's ids and ``IGNORE_INDEX`` on the prompt. Training (``training.batches``),
description (``generate``) and scoring (``scoring``) all build their token ids here.

Labels are built from the pieces instead of masking by a separately tokenised prompt's length,
which for SentencePiece tokenisers is off by one at the ``ASSISTANT: `` boundary (DESIGN.md,
defect 4); the end token is a label, so the model learns to stop (DESIGN.md, defect 3).
"""

from __future__ import annotations

import torch

from galaxy_llava.errors import UserError
from galaxy_llava.records import load_image

IGNORE_INDEX = -100
# Sane tokenizer length limits are below this; HF uses ~1e30 for "no limit".
_NO_LIMIT = 1_000_000


def encode_text(tokenizer, prompt_ids: list[int], answer_ids: list[int], end_ids: list[int],
                max_length: int | None = None) -> dict[str, torch.Tensor]:
    """1-D ``input_ids`` and ``labels`` for prompt + answer + end token(s): -100 on the prompt
    (image tokens included), the ids on answer + end (the model learns to stop: DESIGN.md,
    defect 3).

    Nothing is truncated: an example longer than ``max_length`` (default: the tokenizer's limit)
    is an error, since cutting would drop image tokens or the end token the model must learn."""
    if not answer_ids:
        raise UserError("empty caption")
    answer = list(answer_ids) + list(end_ids)
    ids = list(prompt_ids) + answer
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT and len(ids) > limit:
        raise UserError(f"example of {len(ids)} tokens exceeds the limit of {limit}; shorten the "
                        "prompt or caption")
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer, dtype=torch.long)}


class PromptIds:
    """A prompt's ids per image-token count (the only thing they depend on), built once each."""

    def __init__(self, processor, family, prompt: str):
        self.processor, self.family, self.prompt = processor, family, prompt
        self._by_count: dict[int, list[int]] = {}

    def __call__(self, image_inputs: dict) -> list[int]:
        n = self.family.num_image_tokens(self.processor, image_inputs)
        if n not in self._by_count:
            self._by_count[n] = self.family.prompt_ids(self.processor, self.prompt, n)
        return self._by_count[n]


def encode_example(processor, family, image, caption: str, prompt: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """One training example without a dataset: ``input_ids``, ``labels`` and the image inputs
    of ``image`` (a PIL image or a path)."""
    if not hasattr(image, "convert"):
        image = load_image(image)
    inputs = family.image_inputs(processor, image)
    prompt_ids = PromptIds(processor, family, prompt or family.default_prompt(processor))(inputs)
    tok = processor.tokenizer
    out = encode_text(tok, prompt_ids, family.answer_ids(tok, caption), family.end_ids(tok))
    return {**out, **inputs}
