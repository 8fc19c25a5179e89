"""Training examples: prepared JSONL records, images, token ids with exact labels, and batching.

Labels are built from the pieces (prompt ids, then the caption's ids as they follow the prompt at
generation time, then EOS) instead of masking by a separately tokenised prompt's length, which for
SentencePiece tokenisers is off by one at the ``ASSISTANT: `` boundary (reference defect 4). The
image is processed once and separately from the text (defect 7), so a trainer can tokenise a
dataset once and cache pixel values or vision features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from galaxy_llava.errors import UserError
from galaxy_llava.modeling import DEFAULT_PROMPT

IGNORE_INDEX = -100
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Sane tokenizer length limits are below this; HF uses ~1e30 for "no limit".
_NO_LIMIT = 1_000_000


def load_image(path: str | os.PathLike, decode: bool = True) -> Image.Image | None:
    """Open an image as RGB; a missing, non-image or decompression-bomb file is a UserError.

    With ``decode=False`` only the header is read (a cheap check that the file is an image)."""
    try:
        with Image.open(path) as im:
            # PIL only refuses above twice MAX_IMAGE_PIXELS; refuse above it, like the catalogue.
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
            return im.convert("RGB") if decode else None
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image file PIL can read") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path} is too large to open safely (decompression-bomb guard)") from None
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def num_image_tokens(processor) -> int:
    """How many ``<image>`` placeholders one image needs: patches, plus CLS unless the strategy
    drops it."""
    ip = processor.image_processor
    crop = (getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", True) else None) or {}
    size = getattr(ip, "size", None) or {}
    height = crop.get("height") or size.get("height") or size.get("shortest_edge")
    width = crop.get("width") or size.get("width") or size.get("shortest_edge")
    patch = processor.patch_size
    if patch is None or height is None:
        raise UserError("the processor has no patch_size or image size; load it with load_model()")
    n = (height // patch) * (width // patch) + (processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def _image_token(tokenizer) -> str:
    return getattr(tokenizer, "image_token", None) or "<image>"


def encode_prompt(tokenizer, prompt: str, num_image_tokens: int) -> list[int]:
    """Token ids of a prompt (BOS first), its ``<image>`` expanded to ``num_image_tokens`` copies.

    Training and generation both use this, so the model sees identical prompt ids in both."""
    image_token = _image_token(tokenizer)
    if prompt.count(image_token) != 1:
        raise UserError(f"the prompt must contain {image_token} exactly once: {prompt!r}")
    ids = tokenizer(prompt.replace(image_token, image_token * num_image_tokens),
                    add_special_tokens=True).input_ids
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if sum(i == image_id for i in ids) != num_image_tokens:
        raise UserError(f"the tokenizer does not keep {image_token} as one token")
    return list(ids)


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


def encode_text(tokenizer, caption: str, prompt: str | None = None, num_image_tokens: int = 576,
                max_length: int | None = None) -> dict[str, torch.Tensor]:
    """1-D ``input_ids``, ``attention_mask`` and ``labels`` for prompt + caption + EOS (no image).

    Labels are -100 on the prompt (image tokens included) and equal the ids on caption + EOS.
    Nothing is truncated: an example longer than ``max_length`` (default: the tokenizer's limit)
    is an error, since cutting would drop image tokens or the EOS the model must learn."""
    prompt_ids = encode_prompt(tokenizer, prompt or DEFAULT_PROMPT, num_image_tokens)
    answer = encode_answer(tokenizer, caption) + [tokenizer.eos_token_id]
    ids = prompt_ids + answer
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT and len(ids) > limit:
        raise UserError(f"example of {len(ids)} tokens exceeds the limit of {limit} "
                        f"(caption {caption[:60]!r}...); shorten the prompt or caption")
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer, dtype=torch.long),
    }


def pixel_values(processor, images: Image.Image | list[Image.Image]) -> torch.Tensor:
    """Pixel values from the image processor: (3, H, W) for one image, (N, 3, H, W) for a list."""
    single = isinstance(images, Image.Image)
    out = processor.image_processor(images=[images] if single else list(images),
                                    return_tensors="pt")["pixel_values"]
    return out[0] if single else out


def encode_example(processor, image: Image.Image | str | os.PathLike, caption: str,
                   prompt: str | None = None,
                   max_length: int | None = None) -> dict[str, torch.Tensor]:
    """One training example: 1-D ``input_ids``, ``attention_mask``, ``labels`` and (3, H, W)
    ``pixel_values``."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    out = encode_text(processor.tokenizer, caption, prompt, num_image_tokens(processor), max_length)
    out["pixel_values"] = pixel_values(processor, image)
    return out


class Collator:
    """Batch examples: pad ``input_ids`` with the pad id, ``labels`` with -100 (defect 2),
    ``attention_mask`` with 0; stack every other tensor (pixel values, cached features)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if pad_token_id is None:
            raise UserError("the tokenizer has no pad token")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

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
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {}
        for key in features[0]:
            values = [torch.as_tensor(f[key]) for f in features]
            if key in pad_values:
                batch[key] = self._pad(values, pad_values[key])
            else:
                batch[key] = torch.stack(values)
        return batch


def _jsonl_path(data: str | os.PathLike) -> Path:
    path = Path(data)
    if path.is_dir():
        path = path / "dataset.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found (expected a prepared data folder or its dataset.jsonl)")
    return path


def _parse_lines(path: Path, lines: Iterable[str]) -> list[dict]:
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"image", "text"} <= set(record):
            raise UserError(f"{path}:{lineno}: a record needs \"image\" and \"text\" fields")
        records.append(record)
    return records


def load_records(data: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Records of a prepared dataset (folder or ``dataset.jsonl``), optionally one split only.

    Image paths are resolved against the JSONL's folder and made absolute; a missing image, a
    malformed line (with its number) or an unknown or empty split is a UserError."""
    path = _jsonl_path(data)
    with open(path, encoding="utf-8") as f:
        records = _parse_lines(path, f)
    if split is not None:
        present = sorted({str(r.get("split")) for r in records if r.get("split") is not None})
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise UserError(f"split {split!r} is empty or absent in {path}; "
                            f"splits present: {', '.join(present) or 'none'}")
    root = path.parent.resolve()
    for r in records:
        image = Path(r["image"]).expanduser()
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise UserError(f"image {r['image']} of {path} not found (looked for {image})")
        r["image"] = str(image)
    return records
