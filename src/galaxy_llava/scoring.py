"""The model's probability of every caption the grammar can produce, for each image.

A rule set's captions are a finite list (``rules.rule_set(name).reachable()``), so instead of
decoding we can score them all: the prompt and the image run once (their key/value cache is
shared), then the candidates (with the family's end token) run once more as one prefix tree, each
shared token once, as the tree attention of speculative decoding does (:func:`tree_log_probs`).
The log-probabilities normalised over the candidates
give a posterior; its argmax is the most probable caption (always inside the grammar), its sums
per attribute value are that attribute's probabilities, and its entropy says how sure the model
is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from galaxy_llava.models.encoding import PromptIds
from galaxy_llava.models.registry import family_for
from galaxy_llava.morphology import ATTRIBUTES, Morphology, value_label
from galaxy_llava.records import load_image
from galaxy_llava.rules import rule_set


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
        # A sum of softmax values can exceed 1 by a rounding step; a probability cannot.
        marginals[attribute] = {v: min(1.0, p) for v, p in sorted(sums.items())}
    logp = torch.log_softmax(t, dim=0)
    entropy = float(-(post * logp).sum())
    best = int(post.argmax())
    return GrammarScores([m.caption() for m in morphologies], [float(x) for x in t],
                         post.tolist(), morphologies[best].caption(), marginals,
                         entropy if math.isfinite(entropy) else 0.0)


@dataclass
class CaptionTree:
    """The candidates' token sequences (answer + end token) as a prefix tree: each distinct
    prefix of a sequence is one node, in an order where a parent comes before its children."""

    tokens: list[int]               # each node's token
    parents: list[int]              # each node's parent (-1: the node follows the prompt)
    paths: list[list[int]]          # each candidate's nodes, root first
    _tensors: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, sequences: list[list[int]]) -> CaptionTree:
        """The tree of ``sequences`` (shared prefixes become shared nodes)."""
        index: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        paths = []
        for seq in sequences:
            path: list[int] = []
            for t in range(len(seq)):
                key = tuple(seq[:t + 1])
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(seq[t])
                    parents.append(path[-1] if path else -1)
                path.append(index[key])
            paths.append(path)
        return cls(tokens, parents, paths)

    def depths(self) -> list[int]:
        """Each node's distance from the prompt (0 for the first token of an answer)."""
        out: list[int] = []
        for p in self.parents:
            out.append(0 if p < 0 else out[p] + 1)
        return out

    def ancestors(self) -> torch.Tensor:
        """[nodes, nodes] bool: row i is true at i and at each of its ancestors, the tokens
        node i may attend to inside the tree (its own caption so far)."""
        n = len(self.tokens)
        seen = torch.zeros((n, n), dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                seen[i] = seen[p]
            seen[i, i] = True
        return seen

    def inner(self) -> list[int]:
        """The nodes with children, in order: the only ones the model must run, since a
        node's token is scored by its parent's logits (leaves are end tokens)."""
        return sorted(set(p for p in self.parents if p >= 0))

    def tensors(self, device, dtype) -> dict:
        """What :func:`tree_log_probs` feeds the model and reads back, built once per device
        and dtype: the inner nodes' tokens, depths and additive attention mask among
        themselves; every node's token, the first tokens (``roots``) and the others with their
        parent's row among the inner nodes; and the candidates x nodes path matrix."""
        key = (str(device), dtype)
        if key not in self._tensors:
            inner = self.inner()
            row = {node: k for k, node in enumerate(inner)}
            on_path = torch.zeros((len(self.paths), len(self.tokens)), dtype=torch.float64)
            for c, path in enumerate(self.paths):
                on_path[c, path] = 1.0
            rest = [i for i, p in enumerate(self.parents) if p >= 0]
            tokens, depths = torch.tensor(self.tokens), torch.tensor(self.depths())
            self._tensors[key] = {k: v.to(device) for k, v in {
                "run_tokens": tokens[inner], "run_depths": depths[inner],
                "mask": _additive(self.ancestors()[inner][:, inner], dtype),
                "tokens": tokens, "rest": torch.tensor(rest, dtype=torch.long),
                "roots": torch.tensor([i for i, p in enumerate(self.parents) if p < 0]),
                "rest_rows": torch.tensor([row[self.parents[i]] for i in rest],
                                          dtype=torch.long),
                "on_path": on_path}.items()}
        return self._tensors[key]


def caption_tree(family, tokenizer, captions: list[str]) -> CaptionTree:
    """The tree of ``captions`` as the family writes answers (answer ids + end ids)."""
    return CaptionTree.build([family.answer_ids(tokenizer, c) + family.end_ids(tokenizer)
                              for c in captions])


def caption_log_probs(model, processor, image, captions: list[str], prompt: str | None = None
                      ) -> list[float]:
    """log p(caption + end token | prompt, image) for each caption (:func:`batch_log_probs`
    for one image)."""
    return batch_log_probs(model, processor, [image], captions, prompt)[0]


class CaptionScorer:
    """log p(caption + end token | prompt, image) of a fixed list of captions, for batches of
    images: the prompt's ids and the captions' token tree are built once.

    Each call runs one forward over the batch's prompts and images (left-padded to one length)
    and one over the caption tree (:func:`tree_log_probs`)."""

    def __init__(self, model, processor, captions: list[str], prompt: str | None = None):
        self.model, self.processor, self.captions = model, processor, list(captions)
        self.family = family_for(model)
        self.prompt_ids = PromptIds(processor, self.family,
                                    prompt or self.family.default_prompt(processor))
        self.tree = caption_tree(self.family, processor.tokenizer, self.captions)

    @torch.no_grad()
    def __call__(self, images: list) -> list[list[float]]:
        """One list of the captions' log-probabilities per image (PIL images)."""
        per_image = [self.family.image_inputs(self.processor, im) for im in images]
        prefixes = [self.prompt_ids(x) for x in per_image]
        return tree_log_probs(self.model, self.processor, self.family, per_image, prefixes,
                              self.tree)


def batch_log_probs(model, processor, images: list, captions: list[str],
                    prompt: str | None = None) -> list[list[float]]:
    """log p(caption + end token | prompt, image) of every caption for each image, all images
    in one forward (:class:`CaptionScorer`)."""
    return CaptionScorer(model, processor, captions, prompt)(images)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean attention pattern as the additive float mask eager and sdpa attention both
    take: 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def tree_log_probs(model, processor, family, per_image: list[dict], prefixes: list[list[int]],
                   tree: CaptionTree) -> list[list[float]]:
    """Every tree path's log-probability for each image (its inputs and prompt ids).

    The prompts run left-padded as one batch, keeping their key/value cache; then every inner
    node of the tree (one with children) runs once per image, as one segment after that cache,
    with a mask that lets a node see its own prompt and its ancestors only, at the position its
    token has in a plain forward over prompt + caption (prompt length + depth; Qwen2-VL's
    multimodal rotary positions through the family). A node's log-probability comes from its
    parent's logits (the prompt's last position for a first token), so leaves (end tokens) never
    run; a candidate's is the sum over its path."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    n_images, width = len(prefixes), max(map(len, prefixes))
    pad = processor.tokenizer.pad_token_id or 0
    ids = torch.full((n_images, width), pad, dtype=torch.long)
    real = torch.zeros((n_images, width), dtype=torch.bool)
    for i, p in enumerate(prefixes):  # left-padded: every prompt ends at the last column
        ids[i, width - len(p):], real[i, width - len(p):] = torch.tensor(p), True
    ids, real = ids.to(device), real.to(device)
    inputs = {k: torch.cat([x[k] for x in per_image]).to(device) for k in per_image[0]}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    inputs.update({k: v.to(device) for k, v in family.token_inputs(ids, processor).items()})
    positions, following = family.prefix_positions(model, ids, real.long(), inputs)
    if bool(real.all()):
        mask = torch.ones_like(ids)  # the library's own causal mask
    else:  # causal over real tokens; a padding row sees itself (finite, never seen)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        eye = torch.eye(width, dtype=torch.bool, device=device)
        mask = _additive((causal & real[:, None, :]) | eye, dtype).unsqueeze(1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **inputs)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = out.logits[:, -1].float()                                       # (images, vocab)

    t = tree.tensors(device, dtype)
    # A node's token is scored by its parent's logits: the prompt's last position for a first
    # token, else the parent's row among the inner nodes.
    node_logp = torch.empty((n_images, len(tree.tokens)), dtype=torch.float32, device=device)
    roots, rest, rows = t["roots"], t["rest"], t["rest_rows"]
    node_logp[:, roots] = (first[:, t["tokens"][roots]]
                           - torch.logsumexp(first, dim=-1, keepdim=True))
    if len(rest):
        n = len(t["run_tokens"])
        seen = torch.cat([_additive(real, dtype)[:, None, :].expand(n_images, n, width),
                          t["mask"].expand(n_images, n, n)], dim=2).unsqueeze(1)
        logits = model(input_ids=t["run_tokens"].expand(n_images, n), attention_mask=seen,
                       position_ids=family.continuation_positions(following, t["run_depths"]),
                       cache=cache, use_cache=False).logits.float()
        node_logp[:, rest] = (logits[:, rows, t["tokens"][rest]]
                              - torch.logsumexp(logits, dim=-1)[:, rows])
    return (node_logp.double() @ t["on_path"].T).tolist()


GPU_SCORE_IMAGES = 16  # images per scoring forward on a GPU (memory, see grammar_scores)
CPU_SCORE_IMAGES = 4  # measured fastest on a CPU (benchmarks/catalogue_throughput.py)


def grammar_scores(model, processor, images, rules: str = "reference",
                   prompt: str | None = None, batch_size: int | None = None
                   ) -> list[GrammarScores]:
    """The posterior over ``rules``' captions for each image (PIL images or paths), scoring
    ``batch_size`` images per forward (:class:`CaptionScorer`). By default
    ``CPU_SCORE_IMAGES`` on a CPU and ``GPU_SCORE_IMAGES`` on a GPU, where each image holds
    its key/value cache over prompt + tree (~1,350 tokens at TinyLLaVA's shapes) and its
    inner nodes' logits over the vocabulary (~650 x 32k)."""
    candidates = rule_set(rules).reachable()
    scorer = CaptionScorer(model, processor, [m.caption() for m in candidates], prompt)
    if batch_size is None:
        on_gpu = next(model.parameters()).device.type == "cuda"
        batch_size = GPU_SCORE_IMAGES if on_gpu else CPU_SCORE_IMAGES
    images = list(images)
    out = []
    for i in range(0, len(images), max(1, batch_size)):
        batch = [im if hasattr(im, "convert") else load_image(im)
                 for im in images[i:i + batch_size]]
        out += [posterior_summary(candidates, lp) for lp in scorer(batch)]
    return out


# ----------------------------------------------------------------- scored columns
# The names describe --scores, the catalogue and the web app give a scored image's columns.

def value_column(attribute: str, value: str) -> str:
    """``p_<attribute>_<value>`` with every run of non-alphanumerics in the value as ``_``
    (``p_shape_in_between``, ``p_type_edge_on_disk``)."""
    return f"p_{attribute}_{re.sub(r'[^0-9a-zA-Z]+', '_', value).strip('_').lower()}"


def by_caption(rules: str) -> dict[str, Morphology]:
    """Each caption of the rule set ``rules`` -> its Morphology: what :func:`score_columns`
    reads a best caption's attributes from."""
    return {m.caption(): m for m in rule_set(rules).reachable()}


def score_column_names(rules: str) -> tuple[dict, list[str]]:
    """(:func:`by_caption` of the rule set, the ``p_`` columns in order): what
    :func:`score_columns` needs, and the catalogue's schema."""
    captions = by_caption(rules)
    candidates = list(captions.values())
    values = posterior_summary(candidates, [0.0] * len(candidates)).marginals
    return captions, [value_column(a, v) for a in ATTRIBUTES for v in values[a]]


# Yes/no attributes (bar, prominent_bulge, ...): boolean columns, as in the prepared dataset.
BOOLEAN = tuple(f.name for f in fields(Morphology) if isinstance(f.default, bool))


def score_columns(scores, captions: dict) -> dict:
    """The scored columns of one row: ``best_caption``, each attribute's predicted value (that
    of the best caption; a boolean for yes/no attributes), ``p_<attribute>_<value>`` and
    ``entropy``."""
    best = captions[scores.best]
    row: dict[str, Any] = {"best_caption": scores.best}
    for a in ATTRIBUTES:
        row[a] = getattr(best, a) if a in BOOLEAN else value_label(best, a)
    for a in ATTRIBUTES:
        for v, p in scores.marginals[a].items():
            row[value_column(a, v)] = p
    row["entropy"] = scores.entropy
    return row
