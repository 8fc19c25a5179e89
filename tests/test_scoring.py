"""scoring: the posterior over the grammar's captions, exact against plain forwards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from galaxy_llava.morphology import ATTRIBUTES, Morphology, parse_caption
from galaxy_llava.rules import rule_set
from galaxy_llava.scoring import (batch_log_probs, caption_log_probs, grammar_scores,
                                 posterior_summary)
from galaxy_llava.toy.tiny import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3),
                                                                dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.toy.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp(request.param) / "m", family=request.param)
    model, processor = load_model(folder, device="cpu", dtype=torch.float32)
    return model.eval(), processor


def _plain_log_prob(model, processor, image, caption):
    """log p(caption + end | prompt, image) from one plain forward over the whole example."""
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.training.batches import Collator, encode_example

    family = family_for(model)
    batch = Collator(processor.tokenizer.pad_token_id, family=family, processor=processor)(
        [encode_example(processor, family, image, caption)])
    labels = batch.pop("labels")[0]
    batch.pop("label_mask")
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits[0].float(), dim=-1)
    return float(sum(logp[t - 1, labels[t]] for t in range(1, len(labels)) if labels[t] != -100))


def test_shared_prefix_scores_equal_separate_plain_forwards(family_model):
    model, processor = family_model
    captions = [m.caption() for m in rule_set("reference").reachable()[::13]]
    fast = caption_log_probs(model, processor, _image(), captions)
    for caption, score in zip(captions, fast):
        assert score == pytest.approx(_plain_log_prob(model, processor, _image(), caption),
                                      abs=1e-3)


def test_posterior_is_a_distribution_and_its_best_caption_parses(family_model):
    model, processor = family_model
    (scores,) = grammar_scores(model, processor, [_image(1)], rules="reference")
    assert len(scores.captions) == len(rule_set("reference").reachable())
    assert sum(scores.posterior) == pytest.approx(1.0, abs=1e-9)
    assert parse_caption(scores.best).parsed_ok and scores.best in scores.captions
    assert scores.posterior[scores.captions.index(scores.best)] == max(scores.posterior)
    for attribute in ATTRIBUTES:
        assert sum(scores.marginals[attribute].values()) == pytest.approx(1.0, abs=1e-9)
    assert 0 <= scores.entropy <= math.log(len(scores.captions)) + 1e-9


def test_posterior_summary_by_hand():
    a = Morphology(type="spiral")
    b = Morphology(type="spiral", bar=True)
    c = Morphology(type="elliptical", shape="round")
    s = posterior_summary([a, b, c], [math.log(0.5), math.log(0.3), math.log(0.2)])
    assert s.posterior == pytest.approx([0.5, 0.3, 0.2]) and s.best == a.caption()
    assert s.marginals["type"] == pytest.approx({"elliptical": 0.2, "spiral": 0.8})
    assert s.marginals["bar"] == pytest.approx({"false": 0.7, "true": 0.3})
    assert s.entropy == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3)
                                        + 0.2 * math.log(0.2)))
    top = s.to_dict(top=2)["top"]
    assert [t["caption"] for t in top] == [a.caption(), b.caption()]


def test_describe_scores_through_the_cli(tiny_model_dir, prepared_dir, capsys):
    import json

    from galaxy_llava.cli import main

    images = sorted((prepared_dir / "images").glob("*.jpg"))[:2]
    assert main(["describe", "--model", str(tiny_model_dir), *map(str, images), "--scores",
                 "--num-beams", "1", "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert parse_caption(r["scores"]["best"]).parsed_ok
        assert sum(r["scores"]["marginals"]["type"].values()) == pytest.approx(1.0)
        assert set(r["scores"]["marginals"]["shape"]) <= {"none", "round", "in-between", "cigar"}


def test_images_scored_together_equal_images_scored_alone(family_model):
    """The batched prefix + (images x candidates) continuation gives each image's own scores."""
    model, processor = family_model
    captions = [m.caption() for m in rule_set("reference").reachable()[::9]]
    images = [_image(0), _image(1), _image(2)]
    together = batch_log_probs(model, processor, images, captions)
    for image, row in zip(images, together):
        assert row == pytest.approx(caption_log_probs(model, processor, image, captions),
                                    abs=1e-4)
    batched = grammar_scores(model, processor, images, batch_size=2)
    alone = [grammar_scores(model, processor, [im])[0] for im in images]
    assert [s.best for s in batched] == [s.best for s in alone]
