"""Describe galaxy images with a (fine-tuned) vision-language model.

One ``generate`` call per batch: the vision tower runs once per batch (generate encodes the images
before expanding them to beams), prompts are left-padded, only new tokens are decoded and each
answer ends at EOS. No n-gram blocking and no ``min_length`` (DESIGN.md, defect 6): the caption
grammar repeats "bulge at its center", and ``min_length`` would count prompt tokens.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from galaxy_llava.config import DECODING
from galaxy_llava.errors import UserError
from galaxy_llava.imagefiles import find_images, gather_images, image_label
from galaxy_llava.models.encoding import PromptIds
from galaxy_llava.models.registry import family_for
from galaxy_llava.records import load_image, unreadable


def _model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def _cut_at_eos(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids


def describe_images(model, processor, images: Iterable[Image.Image | str | os.PathLike],
                    prompt: str | None = None, *, batch_size: int = DECODING.batch_size,
                    num_beams: int = DECODING.num_beams,
                    max_new_tokens: int = DECODING.max_new_tokens,
                    do_sample: bool = DECODING.do_sample,
                    progress: bool = True) -> list[str]:
    """One description per image (PIL images or paths, loaded a batch at a time), in order.

    Greedy when ``num_beams=1``; stops at the family's end token; returns only the generated
    text, stripped."""
    for name, value in (("batch size", batch_size), ("number of beams", num_beams),
                        ("max new tokens", max_new_tokens)):
        if value < 1:
            raise UserError(f"the {name} must be at least 1, got {value}")
    images = list(images)
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; set one before generating")
    family = family_for(model)
    prompt_ids = PromptIds(processor, family, prompt or family.default_prompt(processor))
    dtype, device = _model_dtype_device(model)
    stop_ids = set(family.end_ids(tok))
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        eos_token_id=sorted(stop_ids), pad_token_id=tok.pad_token_id,
        # Explicit, so a checkpoint's generation_config cannot switch them back on
        # (DESIGN.md, defect 6).
        no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0)
    texts: list[str] = []
    starts = range(0, len(images), batch_size)
    quiet = not progress or len(starts) < 2
    for start in tqdm(starts, desc="describing", unit="batch", disable=quiet):
        batch = [im if isinstance(im, Image.Image) else load_image(im)
                 for im in images[start:start + batch_size]]
        per_image = [family.image_inputs(processor, im) for im in batch]
        ids, mask = _left_pad([prompt_ids(p) for p in per_image], tok.pad_token_id)
        inputs = {k: torch.cat([p[k] for p in per_image]).to(device) for k in per_image[0]}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        inputs.update({k: v.to(device) for k, v in family.token_inputs(ids, processor).items()})
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **inputs, **gen_kwargs)
        for row in out[:, ids.shape[1]:].tolist():
            texts.append(tok.decode(_cut_at_eos(row, stop_ids), skip_special_tokens=True).strip())
    return texts


def expand_image_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their image files the way ``catalogue`` does
    (recursive, sorted, a prepared dataset's ``images/`` only: never its ``preview.png``); a
    missing path is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += find_images(p, flag="folder")
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist")
    return out


def describe_paths(model, paths: Iterable[str | os.PathLike], *,
                   batch_size: int = DECODING.batch_size, num_beams: int = DECODING.num_beams,
                   max_new_tokens: int = DECODING.max_new_tokens, prompt: str | None = None,
                   device=None, scores_rules: str | None = None, fits=None, strict: bool = True,
                   allow_outside: bool = False) -> list[dict]:
    """Describe image files, folders and path lists with a run, model folder or Hub id:
    ``[{image, caption}]`` in input order, with a path list's own columns (ra, dec, ...; one
    named like ours becomes ``input_<name>``); with ``scores_rules``, each also gets the scored
    columns of a ``catalogue`` row, by the same names
    (:func:`galaxy_llava.scoring.score_columns`: ``best_caption``, each attribute's value,
    ``p_<attribute>_<value>``, ``entropy``) from the posterior over that rule set's captions
    (see :mod:`galaxy_llava.scoring`). ``fits``: how FITS cutouts become RGB
    (:class:`galaxy_llava.fitscutouts.FitsOptions`).

    An unreadable file is a UserError with ``strict``; without, it gets ``{image, error}`` in
    its place and the others are described. Uses the prompt stored with the model unless
    ``prompt`` is given."""
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist")
    found = gather_images(paths, allow_outside, fits.band_names if fits else (), flag="input",
                          absolute=False, unique_ids=False)
    # Every header is checked before the model loads, so a stray file fails fast and by name.
    errors = unreadable(found.images, range(len(found.images)), fits, strict)
    from galaxy_llava.models.loading import load_for_inference

    with warnings.catch_warnings():
        if prompt is not None:  # the stored prompt is not needed, so neither is its warning
            warnings.simplefilter("ignore", UserWarning)
        net, processor, stored = load_for_inference(model, device=device)
    columns = found.columns.astype(object).where(found.columns.notna(), None).rename(
        columns=lambda c: f"input_{c}" if c in ("image", "caption", "error") else c)
    captions = None
    if scores_rules:
        from galaxy_llava.scoring import by_caption, grammar_scores, score_columns

        captions = by_caption(scores_rules)
    results: list[dict] = []
    starts = range(0, len(found.images), batch_size)
    for start in tqdm(starts, desc="describing", unit="batch", disable=len(starts) < 2):
        batch, where = [], []
        for k in range(start, min(start + batch_size, len(found.images))):
            result = {"image": image_label(found.images[k]), **columns.iloc[k].to_dict()}
            results.append(result)
            try:
                if k not in errors:
                    batch.append(load_image(found.images[k], options=fits))
                    where.append(result)
            except UserError as e:
                if strict:
                    raise
                errors[k] = str(e)
            if k in errors:
                result["error"] = errors[k]
        if not batch:
            continue
        texts = describe_images(net, processor, batch, prompt or stored, batch_size=batch_size,
                                num_beams=num_beams, max_new_tokens=max_new_tokens,
                                progress=False)
        for result, text in zip(where, texts, strict=True):
            result["caption"] = text
        if captions is not None:
            for result, scores in zip(where, grammar_scores(net, processor, batch, scores_rules,
                                                            prompt or stored), strict=True):
                result.update(score_columns(scores, captions))
    return results
