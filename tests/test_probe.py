"""The linear probe: its probabilities read like the grammar's marginals, the logistic
regressions' labels and probabilities, the pooled features, and (slow) an end-to-end run on the
tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from galaxy_llava.morphology import ATTRIBUTES
from test_evaluate import _check_eval_folder


def test_probe_probabilities_read_like_the_grammar_marginals():
    from galaxy_llava.probe import probe_probabilities

    conditional = {a: {"no": 1.0} for a in ATTRIBUTES}
    conditional.update(type={"elliptical": 0.8, "spiral": 0.2},
                       shape={"round": 0.5, "cigar": 0.25, "none": 0.25},
                       bar={"yes": 0.9, "no": 0.1}, arms={"2": 1.0})
    p = probe_probabilities(conditional)
    # shape is said only of ellipticals: p(round) = p(elliptical) p(round | elliptical)
    assert p["shape"] == pytest.approx({"round": 0.4, "cigar": 0.2, "none": 0.2 + 0.2})
    assert p["bar"] == pytest.approx({"yes": 0.18, "no": 0.02 + 0.8})
    assert p["arms"] == pytest.approx({"2": 0.2, "none": 0.8})
    assert p["disturbed"] == {"no": 1.0} and p["type"] == conditional["type"]
    assert all(sum(v.values()) == pytest.approx(1.0) for v in p.values())


def test_fit_predict_returns_labels_and_their_probabilities():
    import numpy as np

    from galaxy_llava.probe import _fit_predict

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype("float32")
    y = ["a" if v > 0 else "b" for v in x[:, 0]]
    labels, probs = _fit_predict(x[:30], y[:30], x[30:], "a")
    assert [max(p, key=p.get) for p in probs] == labels
    assert all(abs(sum(p.values()) - 1.0) < 1e-12 for p in probs)  # float64, renormalised
    assert sum(lab == t for lab, t in zip(labels, y[30:])) >= 8
    labels, probs = _fit_predict(x[:5], ["c"] * 5, x[30:32], "a")
    assert labels == ["c", "c"] and probs == [{"c": 1.0}, {"c": 1.0}]


def test_pooled_features_are_the_mean_of_each_images_encoder_output(tiny_model_dir,
                                                                   prepared_dir):
    import torch

    from galaxy_llava.probe import pooled_features
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_image, load_records

    net, processor = load_model(tiny_model_dir)
    family = family_for(net)
    paths = [r["image"] for r in load_records(prepared_dir, "train")[:3]]
    got = pooled_features(net, processor, paths, batch_size=2, desc="test")
    assert got.shape == (3, net.config.vision_config.hidden_size) and got.dtype == "float32"
    with torch.no_grad():
        want = [family.vision_features(net, family.image_inputs(processor, load_image(p)))
                .float().mean(dim=1)[0].numpy() for p in paths]
    assert all(abs(got[i] - want[i]).max() < 1e-5 for i in range(3))
    assert abs(got[0] - got[1]).max() > 1e-4  # one row per image, not one per batch


@pytest.mark.slow
def test_probe_end_to_end_on_tiny_model(tiny_model_dir, prepared_dir, tmp_path):
    from galaxy_llava.probe import probe_cli
    from galaxy_llava.records import load_records

    n_test = len(load_records(prepared_dir, "test"))
    probe_cli(SimpleNamespace(model=str(tiny_model_dir), data=prepared_dir, split="test",
                              out=tmp_path / "probe", overwrite=False,
                              allow_outside_paths=False))
    metrics, rows = _check_eval_folder(tmp_path / "probe", "probe", n_test)
    assert metrics["parse_rate"] is None and metrics["mean_length"] is None
    assert metrics["hallucination_rate"] is None or 0 <= metrics["hallucination_rate"] <= 1
    assert metrics["probe"]["feature_dim"] > 0
    assert all(r["parsed_ok"] is None for r in rows)
    assert not math.isnan(metrics["attributes"]["type"]["accuracy"])
