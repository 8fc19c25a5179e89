"""The generic pretraining stage: deterministic scenes outside the galaxy grammar, and a model
whose frozen features then carry the image (the reason the stage exists)."""

import numpy as np
import pytest
import torch

from galaxy_llava.toy.tiny import build_model_in_memory
from galaxy_llava.morphology import parse_caption
from galaxy_llava.toy.pretrain import GENERIC_TEXT, generic_scene, pretrain_tiny, scene_words


def test_scenes_are_deterministic_and_never_galaxy_captions():
    a = [generic_scene(np.random.default_rng(3), 64) for _ in range(3)]
    b = [generic_scene(np.random.default_rng(3), 64) for _ in range(3)]
    for (ia, ca), (ib, cb) in zip(a, b):
        assert ca == cb and np.array_equal(np.asarray(ia), np.asarray(ib))
        assert ia.size == (64, 64) and ia.mode == "RGB"
    for caption in scene_words():
        if caption not in GENERIC_TEXT:
            assert "galaxy" not in caption
        assert parse_caption(caption).unparsed  # outside the galaxy caption grammar


@pytest.mark.slow
def test_pretraining_lowers_the_caption_loss():
    """Seeing comes later (hundreds of steps; the demo checks it end to end): here the stage must
    at least train every part of the model and learn the scene grammar."""
    torch.manual_seed(0)
    model, processor = build_model_in_memory("tiny", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = pretrain_tiny(model, processor, steps=60, batch_size=16, seed=0, progress=False)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    changed = {n.split(".")[1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= changed
