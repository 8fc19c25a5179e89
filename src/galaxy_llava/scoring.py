"""The model's probability of every caption the grammar can produce, for each image.

A rule set's captions are a finite list (``rules.rule_set(name).reachable()``), so instead of
decoding we can score them all: the prompt and the image run once (their key/value cache is
shared), then every candidate caption (with the family's end token) is scored as a
continuation of that prefix in one batch. The log-probabilities normalised over the candidates
give a posterior; its argmax is the most probable caption (always inside the grammar), its sums
per attribute value are that attribute's probabilities, and its entropy says how sure the model
is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from galaxy_llava.morphology import ATTRIBUTES, Morphology, value_label


@dataclass
class GrammarScores:
    """One image's posterior over the grammar's captions."""

    captions: list[str]
    log_probs: list[float]          # log p(caption + end | prompt, image), unnormalised
    posterior: list[float]          # normalised over the candidates
    best: str                       # the most probable caption
    marginals: dict[str, dict[str, float]] = field(default_factory=dict)
    entropy: float = 0.0            # of the posterior, in nats

    def to_dict(self, top: int = 5) -> dict:
        """JSON-ready: the best caption, the top candidates, marginals and entropy."""
        order = sorted(range(len(self.captions)), key=lambda i: -self.posterior[i])[:top]
        return {"best": self.best, "entropy": self.entropy, "marginals": self.marginals,
                "top": [{"caption": self.captions[i], "p": self.posterior[i]} for i in order]}


def posterior_summary(morphologies: list[Morphology], log_probs: list[float]) -> GrammarScores:
    """Normalise ``log_probs`` over the candidates; the argmax, per-attribute marginals and the
    entropy. Pure: no model."""
    t = torch.tensor(log_probs, dtype=torch.float64)
    post = torch.softmax(t, dim=0)
    marginals: dict[str, dict[str, float]] = {}
    for attribute in ATTRIBUTES:
        sums: dict[str, float] = {}
        for m, p in zip(morphologies, post.tolist()):
            sums[value_label(m, attribute)] = sums.get(value_label(m, attribute), 0.0) + p
        marginals[attribute] = dict(sorted(sums.items()))
    logp = torch.log_softmax(t, dim=0)
    entropy = float(-(post * logp).sum())
    best = int(post.argmax())
    return GrammarScores([m.caption() for m in morphologies], [float(x) for x in t],
                         post.tolist(), morphologies[best].caption(), marginals,
                         entropy if math.isfinite(entropy) else 0.0)


def _candidate_batch(family, tokenizer, captions: list[str]):
    """Right-padded candidate ids (answer + end token) and their mask."""
    seqs = [family.answer_ids(tokenizer, c) + family.end_ids(tokenizer) for c in captions]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def caption_log_probs(model, processor, image, captions: list[str], prompt: str | None = None
                      ) -> list[float]:
    """log p(caption + end token | prompt, image) for each caption: the prefix (prompt and
    image) runs once; the candidates continue its key/value cache together."""
    return batch_log_probs(model, processor, [image], captions, prompt)[0]


@torch.no_grad()
def batch_log_probs(model, processor, images: list, captions: list[str],
                    prompt: str | None = None) -> list[list[float]]:
    """:func:`caption_log_probs` for several images at once: their prefixes run as one batch
    and every image's candidates continue its cache in one forward (``len(images) *
    len(captions)`` rows), which is what keeps a GPU busy. Images whose prefixes differ in length
    (tiled processors), and families that cannot continue a cache, are scored one by one."""
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.training.batches import PromptIds

    family = family_for(model)
    param = next(model.parameters())
    prompt_ids = PromptIds(processor, family, prompt or family.default_prompt(processor))
    per_image = [family.image_inputs(processor, im) for im in images]
    prefixes = [prompt_ids(x) for x in per_image]
    ids, mask = _candidate_batch(family, processor.tokenizer, captions)
    ids, mask = ids.to(param.device), mask.to(param.device)
    if family.prefix_cache_scoring and len(set(map(len, prefixes))) == 1:
        groups = [range(len(images))]
    else:  # each image alone, from the inputs already prepared
        groups = [range(i, i + 1) for i in range(len(images))]
    return [row for g in groups for row in _score_group(
        model, processor, family, [per_image[i] for i in g], [prefixes[i] for i in g], ids, mask)]


def _score_group(model, processor, family, per_image: list[dict], prefixes: list[list[int]],
                 ids, mask) -> list[list[float]]:
    """Every candidate's log-probability for images whose prefixes have one length (one image
    when the family cannot continue a cache)."""
    param = next(model.parameters())
    prefix = torch.tensor(prefixes, device=param.device)
    inputs = {k: torch.cat([x[k] for x in per_image]).to(param.device) for k in per_image[0]}
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    inputs.update({k: v.to(param.device) for k, v in family.token_inputs(prefix, processor).items()})
    if not family.prefix_cache_scoring:
        return [_log_probs_uncached(model, prefix, inputs, ids, mask)]
    n_images, n_cand = len(per_image), len(ids)
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, **inputs)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)            # (images, vocab)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(n_cand)  # row i * n_cand + j: image i, candidate j
    ids, mask = ids.repeat(n_images, 1), mask.repeat(n_images, 1)
    full_mask = torch.cat([torch.ones((len(ids), prefix.shape[1]), dtype=torch.long,
                                      device=param.device), mask], dim=1)
    cont = model(input_ids=ids, attention_mask=full_mask, cache=cache, use_cache=False)
    logp = torch.log_softmax(cont.logits.float(), dim=-1)
    # Token t of a candidate is predicted by the prefix's last position (t = 0) or by the
    # candidate's own position t - 1.
    scores = first.repeat_interleave(n_cand, dim=0).gather(1, ids[:, :1]).squeeze(1)
    follow = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = scores + (follow * mask[:, 1:]).sum(dim=1)
    return scores.view(n_images, n_cand).tolist()


def _log_probs_uncached(model, prefix, inputs, ids, mask) -> list[float]:
    """The same scores from one plain forward over prefix + candidate per row (for families
    whose positions cannot continue a shared cache, such as Qwen2-VL's multimodal rotary)."""
    n, p = len(ids), prefix.shape[1]
    batch = {k: torch.cat([v] * n) for k, v in inputs.items()}  # one image per row
    full = torch.cat([prefix.repeat(n, 1), ids], dim=1)
    attention = torch.cat([torch.ones((n, p), dtype=torch.long, device=ids.device), mask], dim=1)
    for k, v in list(batch.items()):
        if v.dim() == 2 and v.shape == (n, p):  # per-token inputs: zeros over the answer
            batch[k] = torch.cat([v, torch.zeros_like(ids, dtype=v.dtype)], dim=1)
    logits = model(input_ids=full, attention_mask=attention, **batch).logits.float()
    logp = torch.log_softmax(logits[:, p - 1:-1], dim=-1)
    picked = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1).tolist()


GPU_SCORE_ROWS = 256  # candidate rows per scoring forward on a GPU (memory, see grammar_scores)


def grammar_scores(model, processor, images, rules: str = "reference",
                   prompt: str | None = None, batch_size: int | None = None
                   ) -> list[GrammarScores]:
    """The posterior over ``rules``' captions for each image (PIL images or paths), scoring
    ``batch_size`` images per forward (:func:`batch_log_probs`). By default 1 on a CPU, where
    batching measured slower (``benchmarks/catalogue_throughput.py``: 0.78x with 8), and on a
    GPU as many images as keep ``GPU_SCORE_ROWS`` candidate rows (2 for the 96 ``reference``
    captions): each row holds a copy of the prefix's key/value cache and its logits over the
    vocabulary, about 2.5 GB an image at TinyLLaVA's shapes (estimated, not measured)."""
    from galaxy_llava.records import load_image
    from galaxy_llava.rules import rule_set

    candidates = rule_set(rules).reachable()
    captions = [m.caption() for m in candidates]
    if batch_size is None:
        on_gpu = next(model.parameters()).device.type == "cuda"
        batch_size = max(1, GPU_SCORE_ROWS // len(captions)) if on_gpu else 1
    images = list(images)
    out = []
    for i in range(0, len(images), max(1, batch_size)):
        batch = [im if hasattr(im, "convert") else load_image(im)
                 for im in images[i:i + batch_size]]
        out += [posterior_summary(candidates, lp)
                for lp in batch_log_probs(model, processor, batch, captions, prompt)]
    return out
