"""Training examples and batches: token ids with exact labels, the image (pixels or cached
encoder features), and the collator that pads them and marks where the loss is taken.

Labels are built from the pieces (prompt ids, then the caption's ids as they follow the prompt at
generation time, then EOS) instead of masking by a separately tokenised prompt's length, which for
SentencePiece tokenisers is off by one at the ``ASSISTANT: `` boundary (reference defect 4). Each
item's text is tokenised once and its image processed apart from the text (defect 7).
"""

from __future__ import annotations

from typing import Any

import torch

from galaxy_llava.errors import UserError

IGNORE_INDEX = -100
# Sane tokenizer length limits are below this; HF uses ~1e30 for "no limit".
_NO_LIMIT = 1_000_000


def encode_answer(tokenizer, caption: str) -> list[int]:
    """Caption ids as they follow the prompt at generation time (``▁This``), no EOS."""
    caption = caption.strip()
    if not caption:
        raise UserError("empty caption")
    ids = tokenizer(caption, add_special_tokens=False).input_ids
    first = tokenizer.convert_ids_to_tokens(ids[0])
    if not first.startswith(("▁", "Ġ", " ")):
        # A tokenizer without SentencePiece's dummy prefix: spell the separating space out.
        ids = tokenizer(" " + caption, add_special_tokens=False).input_ids
    return list(ids)


def encode_text(tokenizer, prompt_ids: list[int], caption: str,
                max_length: int | None = None) -> dict[str, torch.Tensor]:
    """1-D ``input_ids`` and ``labels`` for prompt + caption + EOS: -100 on the prompt (image
    tokens included), the ids on caption + EOS (defect 3: the model learns to stop).

    Nothing is truncated: an example longer than ``max_length`` (default: the tokenizer's limit)
    is an error, since cutting would drop image tokens or the EOS the model must learn."""
    answer = encode_answer(tokenizer, caption) + [tokenizer.eos_token_id]
    ids = list(prompt_ids) + answer
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT and len(ids) > limit:
        raise UserError(f"example of {len(ids)} tokens exceeds the limit of {limit} "
                        f"(caption {caption[:60]!r}...); shorten the prompt or caption")
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer, dtype=torch.long)}


class CaptionDataset(torch.utils.data.Dataset):
    """Prepared records as training items: ``input_ids``, ``labels`` and ``pixel_values``, which
    are the image's cached encoder features when ``features`` is given (row per image path),
    else the processed image, loaded per item."""

    def __init__(self, records: list[dict], processor, family, prompt_ids: list[int],
                 features=None, rows: dict[str, int] | None = None):
        tok = processor.tokenizer
        self.family = family
        self.examples = [encode_text(tok, prompt_ids, r["text"]) for r in records]
        self.paths = [r["image"] for r in records]
        self.processor, self.features, self.rows = processor, features, rows

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from galaxy_llava.records import load_image

        if self.features is not None:
            image = self.features.row(self.rows[self.paths[i]])
        else:
            image = self.family.pixel_values(self.processor, load_image(self.paths[i]))
        return dict(self.examples[i], pixel_values=image)


class Collator:
    """Pad ``input_ids`` with the pad id and ``labels`` with -100 (defect 2), build the
    ``attention_mask``, stack ``pixel_values``, and add ``label_mask``: True at positions whose
    next token is a label, where the loss (and ``lm_head``) is needed."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if pad_token_id is None:
            raise UserError("the tokenizer has no pad token")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def _pad(self, seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        length = max(len(s) for s in seqs)
        out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : len(s)] = s
            else:
                out[i, length - len(s):] = s
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"]) for f in features]
        batch = {"input_ids": self._pad(ids, self.pad_token_id),
                 "attention_mask": self._pad([torch.ones_like(s) for s in ids], 0)}
        if "labels" in features[0]:
            labels = self._pad([torch.as_tensor(f["labels"]) for f in features], IGNORE_INDEX)
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            batch["labels"], batch["label_mask"] = labels, mask
        if "pixel_values" in features[0]:
            batch["pixel_values"] = torch.stack([torch.as_tensor(f["pixel_values"])
                                                 for f in features])
        return batch


def encode_example(processor, family, image, caption: str, prompt: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """One training example without a dataset: ``input_ids``, ``labels`` and the processed
    ``pixel_values`` of ``image`` (a PIL image or a path)."""
    from galaxy_llava.config import DEFAULT_PROMPT
    from galaxy_llava.records import load_image

    if not hasattr(image, "convert"):
        image = load_image(image)
    out = encode_text(processor.tokenizer, family.prompt_ids(processor, prompt or DEFAULT_PROMPT),
                      caption)
    out["pixel_values"] = family.pixel_values(processor, image)
    return out
