"""Calibration on hand-made cases (numbers worked out by hand or by scikit-learn's own
functions): Brier score, expected calibration error, AUROC, the vote-fraction error, and the
majority's and the grammar's probabilities in the metrics' labels."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from galaxy_llava.calibration import (PROB_LABELS, auroc, brier_score, calibration,
                                      grammar_probabilities, majority_probabilities, reliability,
                                      vote_error)
from galaxy_llava.gz2 import col
from galaxy_llava.metrics import labels_of
from galaxy_llava.morphology import ATTRIBUTES, Morphology
from test_metrics import TRUTHS


def test_brier_score_hand_computed_and_twice_the_binary_score():
    truth = ["b", "a", "a"]
    probs = [{"a": 0.2, "b": 0.8}, {"a": 0.6, "b": 0.4}, {"a": 1.0}]
    # (0.2^2 + 0.2^2) + (0.4^2 + 0.4^2) + 0, over 3 galaxies; label order must not matter
    assert brier_score(truth, probs, ("b", "a", "c")) == pytest.approx(0.4 / 3)
    assert brier_score(truth, probs, ("a", "b")) == pytest.approx(0.4 / 3)
    from sklearn.metrics import brier_score_loss

    binary = brier_score_loss([t == "b" for t in truth], [p.get("b", 0.0) for p in probs])
    assert brier_score(truth, probs, ("a", "b")) == pytest.approx(2 * binary)
    assert brier_score([], [], ("a",)) is None


def test_expected_calibration_error_hand_computed():
    truth = ["a", "a", "a", "a"]
    probs = [{"a": 0.95, "b": 0.05}, {"a": 0.05, "b": 0.95},  # confident: right, wrong
             {"a": 0.65, "b": 0.35}, {"a": 0.55, "b": 0.45}]
    rel = reliability(truth, probs, ("a", "b"))
    # bin (0.9, 1]: 2 galaxies, accuracy 0.5, confidence 0.95 -> 2/4 * 0.45
    # bin (0.6, 0.7]: accuracy 1, confidence 0.65 -> 1/4 * 0.35; bin (0.5, 0.6]: 1/4 * 0.45
    assert rel["ece"] == pytest.approx(0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.45)
    assert rel["count"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 2]
    assert rel["accuracy"][9] == 0.5 and rel["confidence"][9] == pytest.approx(0.95)
    assert rel["accuracy"][0] is None
    # a confidence on a bin edge goes to the bin it closes: 0.7 is in (0.6, 0.7]
    assert reliability(["a"], [{"a": 0.7, "b": 0.3}], ("a", "b"))["count"][6] == 1
    # calibrated: 0.75 confident and right 3 times in 4
    calibrated = reliability(["a", "a", "a", "b"], [{"a": 0.75, "b": 0.25}] * 4, ("a", "b"))
    assert calibrated["ece"] == pytest.approx(0.0)


def test_auroc_matches_sklearn_and_is_none_when_undefined():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = ("x", "y", "z")
    truth = rng.choice(labels, 30).tolist()
    raw = rng.dirichlet([1, 1, 1], 30)
    probs = [dict(zip(labels, row)) for row in raw]
    want = roc_auc_score(truth, raw, multi_class="ovr", average="macro", labels=list(labels))
    assert auroc(truth, probs, labels) == pytest.approx(want)
    binary = [dict(zip(("x", "y"), (1 - r[0], r[0]))) for r in raw]
    two = [t if t != "z" else "x" for t in truth]
    assert auroc(two, binary, ("x", "y")) == pytest.approx(
        roc_auc_score([t == "y" for t in two], raw[:, 0]))
    assert auroc(["x"] * 3, probs[:3], labels) is None
    assert auroc(["x", "y"], [{"x": 0.5, "y": 0.5}] * 2, labels) == 0.5  # no information


def test_vote_error_against_the_vote_fractions():
    smooth, obvious, dominant = (col("smooth-or-featured", "smooth"),
                                 col("bulge-size", "obvious"), col("bulge-size", "dominant"))
    probs = [{"elliptical": 0.9, "spiral": 0.1}, {"elliptical": 0.2, "spiral": 0.8},
             {"elliptical": 0.5, "spiral": 0.5}]
    fractions = [{smooth: 0.7}, {smooth: 0.1}, {smooth: None}]  # the third has no fraction
    mse, pairs = vote_error("type", probs, fractions)
    assert pairs == 2 and mse == pytest.approx((0.2 ** 2 + 0.1 ** 2) / 2)
    # a prominent bulge is "obvious" or "dominant": both fractions add up when present
    mse, pairs = vote_error("prominent_bulge", [{"yes": 0.5}, {"yes": 0.5}],
                            [{obvious: 0.2, dominant: 0.4}, {obvious: 0.1}])
    assert pairs == 2 and mse == pytest.approx((0.1 ** 2 + 0.4 ** 2) / 2)
    assert vote_error("bar", [{"yes": 1.0}], [None]) == (None, 0)


def _sure(m: Morphology) -> dict:
    """Probability 1 on every true label."""
    return {a: {v: 1.0} for a, v in labels_of(m).items()}


def test_calibration_of_perfect_and_constant_predictors():
    fractions = [{col("smooth-or-featured", "smooth"): 1.0 if t.type == "elliptical" else 0.0}
                 for t in TRUTHS]
    perfect = calibration(TRUTHS, [_sure(t) for t in TRUTHS], fractions)
    assert set(perfect) == set(ATTRIBUTES)
    assert perfect["type"]["brier"] == 0 and perfect["type"]["ece"] == 0
    assert perfect["type"]["auroc"] == 1.0 and perfect["type"]["vote_mse"] == 0
    assert perfect["type"]["vote_pairs"] == 4
    assert perfect["shape"]["n"] == 2 and perfect["bar"]["n"] == 2  # where they apply
    assert perfect["boxy_bulge"]["auroc"] is None  # no galaxy has a boxy bulge
    constant = calibration(TRUTHS, [majority_probabilities(TRUTHS)] * 4)
    assert constant["type"]["auroc"] == 0.5
    assert constant["type"]["ece"] == pytest.approx(0.0)  # 50% sure, right half the time
    assert constant["type"]["vote_mse"] is None and constant["type"]["vote_pairs"] == 0
    # three undisturbed galaxies: 0.25^2 + 0.25^2 each; the disturbed one: 0.75^2 + 0.75^2
    assert constant["disturbed"]["brier"] == pytest.approx((3 * 0.125 + 1.125) / 4)
    json.dumps(constant, allow_nan=False)


def test_majority_and_grammar_probabilities_use_the_metric_labels():
    freq = majority_probabilities(TRUTHS)
    assert freq["type"] == {"elliptical": 0.5, "spiral": 0.5}
    assert freq["shape"] == {"none": 0.5, "round": 0.5}  # over the two ellipticals only
    assert freq["disturbed"] == {"no": 0.75, "yes": 0.25}
    marginals = {a: {"none": 1.0} for a in ATTRIBUTES}
    marginals.update(type={"elliptical": 0.3, "spiral": 0.7}, bar={"false": 0.6, "true": 0.4})
    probs = grammar_probabilities(marginals)
    assert probs["bar"] == {"no": 0.6, "yes": 0.4} and probs["type"]["spiral"] == 0.7
    assert set(probs["bar"]) <= set(PROB_LABELS["bar"])


def test_metrics_and_calibration_import_no_model_code():
    """The metrics are pure: a fresh interpreter imports them without torch, transformers or
    the model code (the test session itself has torch loaded)."""
    code = ("import sys, galaxy_llava.metrics, galaxy_llava.calibration\n"
            "heavy = {'torch', 'transformers', 'galaxy_llava.models'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
