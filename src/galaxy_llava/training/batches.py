"""Training examples and batches: the dataset of prepared records (token ids with exact labels,
encoded by :mod:`galaxy_llava.models.encoding`; the image inputs, processed pixels or cached
encoder features), and the collator that pads them and marks where the loss is taken.

Each caption is tokenised once and each image processed apart from the text (DESIGN.md, defect 7).
"""

from __future__ import annotations

from typing import Any

import torch

from galaxy_llava.errors import UserError
from galaxy_llava.models.encoding import IGNORE_INDEX, PromptIds, encode_text
from galaxy_llava.records import load_image


class CaptionDataset(torch.utils.data.Dataset):
    """Prepared records as training items: ``input_ids``, ``labels`` and the image inputs, whose
    ``pixel_values`` are the image's cached encoder features when ``features`` is given (a
    :class:`~galaxy_llava.training.feature_cache.FeatureStore`, rows by ``rows[path]``), else the
    processed image, loaded per item.

    With ``draw`` (``(epoch, index) -> caption``, e.g.
    :class:`~galaxy_llava.vote_captions.VoteCaptions`) an item's caption is drawn anew for the
    epoch :meth:`set_epoch` last set, instead of the record's ``text``; each distinct caption is
    tokenised once. The epoch is held in shared memory, so DataLoader workers (persistent ones
    too) see what the main process sets."""

    def __init__(self, records: list[dict], processor, family, prompt: str, features=None,
                 rows: dict[str, int] | None = None, draw=None):
        self.processor, self.family, self.features, self.rows = processor, family, features, rows
        self.draw = draw
        self._ids: dict[str, list[int]] = {}  # caption -> answer ids
        self.texts = [r["text"] for r in records]
        if draw is None:  # tokenised up front: a bad caption fails before training starts
            self.answers = [self._answer_ids(t) for t in self.texts]
        self.end_ids = family.end_ids(processor.tokenizer)
        self.paths = [r["image"] for r in records]
        self.prompt_ids = PromptIds(processor, family, prompt)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epoch(self) -> int:
        """The epoch whose captions ``draw`` gives (0 until :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of ``epoch`` from now on (the Trainer's epoch callback sets it)."""
        self._epoch.fill_(int(epoch))

    def caption(self, i: int) -> str:
        """Item ``i``'s caption: drawn for the current epoch, or the record's text."""
        return self.texts[i] if self.draw is None else self.draw(self.epoch, i)

    def _answer_ids(self, caption: str) -> list[int]:
        ids = self._ids.get(caption)
        if ids is None:
            ids = self._ids[caption] = self.family.answer_ids(self.processor.tokenizer, caption)
            if not ids:
                raise UserError("a record has an empty caption")
        return ids

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.features is not None:
            inputs = self.features.inputs(self.rows[self.paths[i]])
        else:
            inputs = self.family.image_inputs(self.processor, load_image(self.paths[i]))
        answer = self.answers[i] if self.draw is None else self._answer_ids(self.caption(i))
        text = encode_text(self.processor.tokenizer, self.prompt_ids(inputs), answer,
                           self.end_ids)
        return {**text, **inputs}


class Collator:
    """Pad ``input_ids`` with the pad id and ``labels`` with -100 (DESIGN.md, defect 2), build the
    ``attention_mask`` and the family's per-token inputs, concatenate the image inputs along
    dim 0, and add ``label_mask``: True at positions whose next token is a label, where the loss
    (and ``lm_head``) is needed."""

    TEXT_KEYS = ("input_ids", "labels")

    def __init__(self, pad_token_id: int, padding_side: str = "right", family=None,
                 processor=None):
        if pad_token_id is None:
            raise UserError("the tokenizer has no pad token")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.family, self.processor = family, processor

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
        for key in features[0]:
            if key not in self.TEXT_KEYS:  # image inputs: one image each, batched along dim 0
                batch[key] = torch.cat([torch.as_tensor(f[key]) for f in features])
        if self.family is not None:
            batch.update(self.family.token_inputs(batch["input_ids"], self.processor))
        return batch
