"""A short generic pretraining stage for the random-initialised tiny model, so that it can see and
speak before it is fine-tuned on galaxies.

Why: a real base model (TinyLLaVA) arrives with a CLIP vision tower that already sees and a
language model that already speaks. A random-initialised tiny LLaVA has neither: its frozen random
vision tower passes almost no image information (the image-to-image variance of its features is
under 1% of their total variance), so fine-tuning with the tower frozen learns the caption grammar
but not to look. This stage stands in for CLIP + LLaVA pretraining: every part of the model,
vision tower included, is trained to caption *generic* synthetic scenes (coloured blobs, rings,
bars, stripes, dots; never galaxies, never the galaxy caption grammar). Fine-tuning then proceeds
exactly as on a real checkpoint: vision tower frozen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from galaxy_llava.io import write_json
from galaxy_llava.models.encoding import IGNORE_INDEX, PromptIds, encode_text
from galaxy_llava.models.folders import write_marker
from galaxy_llava.models.registry import family_for
from galaxy_llava.training.batches import Collator

COLOURS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.3, 0.45, 1.0),
           "yellow": (1.0, 0.9, 0.3), "white": (1.0, 1.0, 1.0)}
KINDS = ("blob", "ring", "bar", "stripes", "cross", "dots")
ELONGATION = {"round": 1.0, "oval": 0.6, "long": 0.3}
DOT_COUNTS = {"two": 2, "three": 3, "many": 6}
PRETRAIN_QUESTION = "What do you see?"
PRETRAIN_PROMPT = "USER: <image>\nWhat do you see?\nASSISTANT:"  # the LLaVA spelling
LOSS_FILE = "pretrain_loss.json"  # beside the model: every step's loss
# Each step draws new scenes, so one step's loss is noisy: the bar and the "final" loss show the
# mean of the last FINAL_WINDOW steps.
FINAL_WINDOW = 10

# Plain English prose for a text-only language-modelling objective: a real base model's language
# model knows common words (galaxy, spiral, bulge, ...) before it is fine-tuned, so its embeddings
# and output rows for them are trained. This prose never uses the caption grammar's phrases.
GENERIC_TEXT = (
    "Galaxies come in many forms and astronomers have sorted them by shape for a century.",
    "An elliptical galaxy looks smooth, and its light fades steadily away from the middle.",
    "Some are round like a ball, others look moderately stretched, a few are highly flattened.",
    "A spiral galaxy has a thin disk in which young blue stars trace winding arms.",
    "Many spirals show two arms, some show three, and flocculent ones have many short arms.",
    "A bar is a straight band of old stars that crosses the center of some disk galaxies.",
    "The bulge is the bright central part; in some galaxies it is prominent, in others small.",
    "Seen edge-on, a disk galaxy looks like a thin line, and its bulge can appear boxy or round.",
    "When two galaxies pass close to each other their shapes become disturbed by gravity.",
    "Merging galaxies often show tidal tails, loops and a second bright core nearby.",
    "Not every image shows a galaxy: a bright star or an artifact can fool a quick look.",
    "This is a picture taken by a telescope, an image of the night sky with faint objects.",
    "Volunteers looked at each image and answered questions about its shape and its features.",
    "The center of a galaxy is often brighter and redder than its outer disk.",
    "Is it smooth or does it have features? Is there a bar? How many arms can you count?",
    "An image of a distant galaxy is small and noisy, so the details are hard to see.",
    "Astronomers describe what they see in short sentences that name the main features.",
    "The arms of a spiral wind around the center, loosely in some and tightly in others.",
)


def text_batch(tokenizer, rng: np.random.Generator, batch_size: int) -> dict:
    """A right-padded batch of GENERIC_TEXT sentences with causal-LM labels (pads -100)."""
    picks = [GENERIC_TEXT[i] for i in rng.integers(len(GENERIC_TEXT), size=batch_size)]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in picks]
    width = max(map(len, ids))
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    labels = torch.full((batch_size, width), IGNORE_INDEX)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, :len(seq)] = torch.tensor(seq)
    return {"input_ids": input_ids, "attention_mask": (labels != IGNORE_INDEX).long(),
            "labels": labels}


def scene_words() -> list[str]:
    """Sample captions of the pretraining grammar and the generic prose (tokenizer corpus)."""
    rng = np.random.default_rng(0)
    return [generic_scene(rng, 32)[1] for _ in range(300)] + list(GENERIC_TEXT) * 4


def _grid(size: int, cx: float, cy: float, angle: float):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def generic_scene(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """One random scene of simple shapes on a noisy dark background, and its caption."""
    kind = KINDS[rng.integers(len(KINDS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    big = bool(rng.integers(2))
    radius = size * (0.28 if big else 0.15) * rng.uniform(0.85, 1.15)
    cx, cy = size / 2 + rng.normal(0, size * 0.04, 2)
    u, v = _grid(size, cx, cy, rng.uniform(0, np.pi))
    words = [f"a {'large' if big else 'small'} {colour}"]
    if kind == "blob":
        elong = list(ELONGATION)[rng.integers(len(ELONGATION))]
        q = ELONGATION[elong]
        alpha = np.exp(-0.5 * ((u / radius) ** 2 + (v / (radius * q)) ** 2) * 2.5)
        words.append(f"{elong} blob")
    elif kind == "ring":
        r = np.hypot(u, v)
        alpha = np.exp(-0.5 * ((r - radius) / (radius * 0.15)) ** 2)
        words.append("ring")
    elif kind == "bar":
        alpha = np.exp(-0.5 * ((u / radius) ** 8 + (v / (radius * 0.18)) ** 2))
        words.append("bar")
    elif kind == "stripes":
        inside = np.exp(-0.5 * ((u / radius) ** 4 + (v / radius) ** 4))
        alpha = inside * (0.5 + 0.5 * np.cos(2 * np.pi * u / (radius * 0.45)))
        words.append("patch of stripes")
    elif kind == "cross":
        w = radius * 0.15
        arm = lambda a, b: np.exp(-0.5 * ((a / radius) ** 8 + (b / w) ** 2))  # noqa: E731
        alpha = np.maximum(arm(u, v), arm(v, u))
        words.append("cross")
    else:
        count_word = list(DOT_COUNTS)[rng.integers(len(DOT_COUNTS))]
        alpha = np.zeros((size, size), np.float32)
        for _ in range(DOT_COUNTS[count_word]):
            px, py = rng.uniform(size * 0.2, size * 0.8, 2)
            pu, pv = _grid(size, px, py, 0.0)
            alpha = np.maximum(alpha, np.exp(-0.5 * (pu ** 2 + pv ** 2) / (size * 0.035) ** 2))
        words = [f"{count_word} {colour} dots"]
    caption = " ".join(words)
    if kind != "dots" and rng.random() < 0.3:
        core = list(COLOURS)[rng.integers(len(COLOURS))]
        r2 = np.hypot(u, v)
        core_alpha = np.exp(-0.5 * (r2 / (size * 0.05)) ** 2)
        caption += f" with a {core} core"
    else:
        core, core_alpha = None, None
    rgb = np.asarray(COLOURS[colour], np.float32)[None, None] * alpha[..., None]
    if core:
        rgb = rgb * (1 - core_alpha[..., None]) + np.asarray(COLOURS[core])[None, None] * core_alpha[..., None]
    rgb = rgb * rng.uniform(0.6, 1.0) + rng.normal(0.05, 0.03, (size, size, 3))
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return img, caption + "."


def pretrain_tiny(model, processor, steps: int = 1200, batch_size: int = 32, lr: float = 2e-3,
                  seed: int = 0, progress: bool = True) -> list[float]:
    """Train every parameter of ``model`` to caption generic scenes, and its language model on
    generic prose; returns the loss per step.

    Scenes are drawn fresh every step (no dataset to overfit). Plain HF forward with labels."""
    rng = np.random.default_rng([seed, 7])
    torch.manual_seed(seed)
    tok = processor.tokenizer
    family = family_for(model)
    prompt = PromptIds(processor, family, family.default_prompt(processor, PRETRAIN_QUESTION))
    end_ids = family.end_ids(tok)
    # LLaVA's processor crops to its input size; the chat families' tiny models take 64 px.
    size = (getattr(processor.image_processor, "crop_size", None) or {}).get("height") or 64
    collate = Collator(tok.pad_token_id, family=family, processor=processor)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (steps * 0.05 + 1)) * max(0.0, 1 - s / steps))
    losses = []
    bar = tqdm(range(steps), desc="pretrain (generic scenes)", disable=not progress)
    for _ in bar:
        scenes = [generic_scene(rng, size) for _ in range(batch_size)]
        items = []
        for img, caption in scenes:
            inputs = family.image_inputs(processor, img)
            text = encode_text(tok, prompt(inputs), family.answer_ids(tok, caption), end_ids)
            items.append({**text, **inputs})
        batch = collate(items)
        del batch["label_mask"]  # the plain HF forward with labels computes its own loss
        text = text_batch(tok, rng, batch_size // 2)
        hidden = model.get_decoder()(input_ids=text["input_ids"],
                                            attention_mask=text["attention_mask"]).last_hidden_state
        text_loss = torch.nn.functional.cross_entropy(
            model.get_output_embeddings()(hidden[:, :-1]).flatten(0, 1),
            text["labels"][:, 1:].flatten())
        loss = model(**batch).loss + text_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-FINAL_WINDOW:]):.3f}", refresh=False)
    model.eval()
    return losses


def loss_summary(losses: list[float]) -> dict:
    """The pretraining loss at the start (the first step) and at the end (the mean of the last
    :data:`FINAL_WINDOW` steps), so a user sees whether the stage learned anything."""
    final = losses[-FINAL_WINDOW:]
    return {"steps": len(losses), "start": float(losses[0]), "final": float(np.mean(final)),
            "final_is_mean_of_last": len(final)}


def save_losses(folder: str | os.PathLike, losses: list[float]) -> dict:
    """Record a pretraining's loss with the model it made: every step in ``folder/``
    :data:`LOSS_FILE`, the :func:`loss_summary` in ``galaxy_llava.json`` (key
    ``pretrain_loss``); both written atomically. Returns the summary."""
    summary = loss_summary(losses)
    write_json(Path(folder) / LOSS_FILE, {
        **summary, "loss": [float(x) for x in losses],
        "definition": "per step: caption cross-entropy on generic scenes + language-model "
                      "cross-entropy on generic prose (galaxy_llava.toy.pretrain)"})
    write_marker(folder, pretrain_loss=summary)
    return summary
