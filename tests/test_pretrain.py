"""The generic pretraining stage: deterministic scenes outside the galaxy grammar, a model whose
frozen features then carry the image (the reason the stage exists), and its loss shown and kept."""

import json

import numpy as np
import pytest
import torch

from galaxy_llava.models.folders import read_marker, write_marker
from galaxy_llava.morphology import parse_caption
from galaxy_llava.toy.pretrain import (FINAL_WINDOW, GENERIC_TEXT, LOSS_FILE, generic_scene,
                                       loss_summary, pretrain_tiny, save_losses, scene_words)
from galaxy_llava.toy.tiny import build_model_in_memory


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


def test_loss_summary_is_the_first_step_and_the_mean_of_the_last():
    losses = [9.0, 7.0] + [5.0] * 20 + [3.0, 1.0]
    summary = loss_summary(losses)
    tail = losses[-FINAL_WINDOW:]
    assert summary == {"steps": 24, "start": 9.0, "final": sum(tail) / len(tail),
                       "final_is_mean_of_last": FINAL_WINDOW}
    assert loss_summary([4.0, 2.0])["final"] == 3.0  # fewer steps than the window


def test_save_losses_keeps_every_step_beside_the_model(tmp_path):
    write_marker(tmp_path, kind="model", prompt="P")
    losses = [float(x) for x in np.linspace(8, 2, 15)]
    summary = save_losses(tmp_path, losses)
    saved = json.loads((tmp_path / LOSS_FILE).read_text())
    assert saved["loss"] == losses and saved["start"] == 8.0
    marker = read_marker(tmp_path)
    assert marker["pretrain_loss"] == summary and marker["kind"] == "model"  # merged, not replaced


def test_progress_bar_shows_the_loss(capsys):
    torch.manual_seed(0)
    model, processor = build_model_in_memory("tiny", seed=0)
    losses = pretrain_tiny(model, processor, steps=2, batch_size=2, seed=0, progress=True)
    assert f"loss={np.mean(losses):.3f}" in capsys.readouterr().err
