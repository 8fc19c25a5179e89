"""The linear probe: its probabilities read like the grammar's marginals, the logistic
regressions' labels and probabilities, the pooled features, and (slow) an end-to-end run on the
tiny model."""

from __future__ import annotations

import math

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
    from galaxy_llava.cli import main
    from galaxy_llava.records import load_records

    n_test = len(load_records(prepared_dir, "test"))
    assert main(["probe", "--model", str(tiny_model_dir), "--data", str(prepared_dir),
                 "--out", str(tmp_path / "probe")]) == 0
    metrics, rows = _check_eval_folder(tmp_path / "probe", "probe", n_test)
    assert metrics["parse_rate"] is None and metrics["mean_length"] is None
    assert metrics["hallucination_rate"] is None or 0 <= metrics["hallucination_rate"] <= 1
    assert metrics["probe"]["feature_dim"] > 0
    assert all(r["parsed_ok"] is None for r in rows)
    assert not math.isnan(metrics["attributes"]["type"]["accuracy"])
    # Zoobot-lite: the vote-fraction regressions are a predictor of their own, with vote MSE
    votes = metrics["votes"]
    assert votes["n"] == n_test and votes["calibration"]["type"]["vote_mse"] is not None
    assert all(sum(r["vote_probabilities"]["type"].values()) == pytest.approx(1.0)
               for r in rows)


def _vote_fixture(n: int, seed: int):
    """Features whose first column sets the smooth fraction (a logistic function of it) and
    whose second sets the artifact fraction; the fractions as records keep them."""
    import numpy as np

    from galaxy_llava.gz2 import col

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    smooth = 0.9 / (1 + np.exp(-2.0 * x[:, 0]))
    artifact = 0.1 / (1 + np.exp(-2.0 * x[:, 1]))
    fractions = [{col("smooth-or-featured", "smooth"): float(s),
                  col("smooth-or-featured", "artifact"): float(a)}
                 for s, a in zip(smooth, artifact)]
    return x, fractions, smooth, artifact


def test_soft_logistic_regression_recovers_known_fractions_better_than_their_mean():
    import numpy as np

    from galaxy_llava.probe import _fit_soft

    x, _, smooth, artifact = _vote_fixture(400, 0)
    soft = np.stack([smooth, artifact, 1 - smooth - artifact], axis=1)
    pred = _fit_soft(x[:300], soft[:300], x[300:])
    assert np.allclose(pred.sum(axis=1), 1.0)
    fitted = ((pred - soft[300:]) ** 2).mean()
    constant = ((soft[:300].mean(axis=0) - soft[300:]) ** 2).mean()
    assert fitted < 0.1 * constant, (fitted, constant)
    # a class no galaxy votes for gets no probability; one class left: its mean
    soft0 = np.stack([smooth, np.zeros_like(smooth), 1 - smooth], axis=1)
    assert (_fit_soft(x[:300], soft0[:300], x[300:])[:, 1] == 0).all()
    one = np.stack([np.ones(300), np.zeros(300)], axis=1)
    assert (_fit_soft(x[:300], one, x[300:302]) == [[1.0, 0.0], [1.0, 0.0]]).all()


def test_zoobot_lite_beats_the_majority_on_vote_mse():
    """fit_vote_fractions on features where the type's fractions are a known function: its
    vote MSE (Zoobot's, through the same calibration as the VLM's) is far below that of the
    classifier it starts from (here the training frequencies, the majority's)."""
    from galaxy_llava.calibration import zoobot_vote_mse, question_predictions
    from galaxy_llava.probe import fit_vote_fractions, probe_probabilities

    x, fractions, smooth, _ = _vote_fixture(500, 1)
    majority = {a: {"no": 1.0} for a in ATTRIBUTES}
    majority.update(type={"elliptical": 0.45, "spiral": 0.4, "edge-on disk": 0.1,
                          "artifact": 0.05}, shape={"round": 1.0}, arms={"2": 1.0})
    classifier = [majority] * 100
    fitted = fit_vote_fractions(x[:400], fractions[:400], x[400:], classifier)
    for row in fitted:
        assert all(sum(p.values()) == pytest.approx(1.0) for p in row.values())
        # the featured mass is shared between spiral and edge-on disk as the classifier does
        assert row["type"]["spiral"] == pytest.approx(4 * row["type"]["edge-on disk"])

    def mse(rows):
        probs = [probe_probabilities(r) for r in rows]
        return zoobot_vote_mse(*question_predictions(probs, fractions[400:])[:3])[
            "questions"]["smooth-or-featured"]["mse"]

    assert mse(fitted) < 0.2 * mse(classifier), (mse(fitted), mse(classifier))
