"""Calibration on hand-made cases (numbers worked out by hand or by scikit-learn's own
functions): Brier score, expected calibration error, AUROC, the vote-fraction error, and the
majority's and the grammar's probabilities in the metrics' labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from galaxy_llava.calibration import (PROB_LABELS, auroc, brier_score, calibration,
                                      format_calibration, grammar_probabilities,
                                      majority_probabilities, question_predictions, reliability,
                                      vote_record_columns, vote_targets, zoobot_vote_mse)
from galaxy_llava.gz2 import col, votes_col
from galaxy_llava.metrics import labels_of
from galaxy_llava.morphology import ATTRIBUTES, Morphology
from conftest import loaded_by
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


def test_yes_no_auroc_is_binary_on_p_yes_even_where_p_no_saturates():
    """A confident model's p(no) rounds to exactly 1.0 while its p(yes) stays distinct: the old
    macro average over {no, yes} ranked by p(no) tied those galaxies; the binary AUROC of p(yes)
    (scikit-learn's roc_auc_score(y, p_yes)) does not."""
    from sklearn.metrics import roc_auc_score

    truth = ["no", "yes", "no", "yes", "no", "yes", "no", "yes"]
    p_yes = np.array([1e-20, 1e-18, 3e-18, 2e-17, 0.3, 0.9, 0.2, 0.1])
    probs = [{"no": 1.0 - p, "yes": p} for p in p_yes]
    assert [pr["no"] for pr in probs[:4]] == [1.0] * 4  # saturated
    y = np.array([t == "yes" for t in truth])
    want = roc_auc_score(y, p_yes)
    p_no = np.array([pr["no"] for pr in probs])
    old = (roc_auc_score(~y, p_no) + roc_auc_score(y, p_yes)) / 2
    assert old != pytest.approx(want)  # the old number was wrong here
    assert auroc(truth, probs, ("no", "yes")) == pytest.approx(want)
    # a p(yes) saturated at 1.0 too is told apart by its p(no), summed separately
    top = [{"no": 1e-19, "yes": 1.0}, {"no": 1e-17, "yes": 1.0}]
    assert auroc(["yes", "no"], top, ("no", "yes")) == 1.0
    # multi-class keeps one-vs-rest macro, ranked so that two p = 1.0 do not tie either
    types = ["elliptical", "spiral", "elliptical", "spiral"]
    sure = [{"elliptical": 1.0, "spiral": 1e-20}, {"elliptical": 1.0, "spiral": 1e-18},
            {"elliptical": 0.9, "spiral": 0.1}, {"elliptical": 0.2, "spiral": 0.8}]
    assert auroc(types, sure, PROB_LABELS["type"]) == pytest.approx(0.75)  # 0.6875 before


def test_zoobot_vote_mse_hand_computed():
    """Mean squared error over (galaxy, answer) pairs of galaxies with >= half the volunteers
    asked; NaN predictions or fractions are skipped, questions missing anywhere ignored."""
    pred = {"bar": np.array([[0.5], [0.9], [0.2], [np.nan]]),
            "how-rounded": np.array([[0.6, 0.4], [0.1, 0.8]]), "only-here": np.ones((1, 1))}
    frac = {"bar": np.array([[0.3], [0.1], [np.nan], [0.5]]),
            "how-rounded": np.array([[0.5, 0.5], [0.1, 0.6]])}
    asked = {"bar": np.array([0.5, 0.49, 1.0, 1.0]), "how-rounded": np.array([1.0, 0.7])}
    out = zoobot_vote_mse(pred, frac, asked)
    assert out["questions"]["bar"] == {"mse": pytest.approx(0.04), "pairs": 1, "galaxies": 1}
    hr = (0.1 ** 2 + 0.1 ** 2 + 0 + 0.2 ** 2) / 4
    assert out["questions"]["how-rounded"]["mse"] == pytest.approx(hr)
    assert out["pairs"] == 5 and out["mse"] == pytest.approx((0.04 + 4 * hr) / 5)
    assert "only-here" not in out["questions"]
    assert zoobot_vote_mse(pred, frac, asked, min_asked=1.01)["mse"] is None


def _face_on(featured: float, edge_on_no: float, bar_yes: float) -> dict:
    return {col("smooth-or-featured", "smooth"): 1 - featured,
            col("smooth-or-featured", "featured-or-disk"): featured,
            col("smooth-or-featured", "artifact"): 0.0,
            col("disk-edge-on", "yes"): 1 - edge_on_no, col("disk-edge-on", "no"): edge_on_no,
            col("bar", "yes"): bar_yes}


def test_vote_mse_is_conditional_on_the_question_and_masked_as_zoobot_does():
    """The old vote error compared the joint p(spiral and bar) = 0.4 with the bar fraction 0.5
    (conditional on the question) and never masked. Zoobot's: p(bar | spiral) = 0.4 / 0.8 =
    0.5 is exactly right, and a galaxy only 0.9 * 0.5 = 45% of whose volunteers were asked
    about a bar does not count."""
    probs = [{"type": {"spiral": 0.8, "elliptical": 0.2}, "bar": {"yes": 0.4, "no": 0.6}}] * 2
    fractions = [_face_on(0.9, 0.9, 0.5), _face_on(0.9, 0.5, 0.0)]
    pred, frac, asked, targets = question_predictions(probs, fractions)
    assert pred["bar"][:, 0].tolist() == [0.5, 0.5] and frac["bar"][:, 0].tolist() == [0.5, 0.0]
    assert asked["bar"].tolist() == pytest.approx([0.81, 0.45])
    assert [t.given for t in targets["bar"]] == [("spiral",)]
    out = zoobot_vote_mse(pred, frac, asked)["questions"]["bar"]
    assert out == {"mse": 0.0, "pairs": 1, "galaxies": 1}
    old = np.mean([(0.4 - 0.5) ** 2, (0.4 - 0.0) ** 2])  # joint vs conditional, unmasked
    assert old > 0.08
    cal = calibration([Morphology("spiral")] * 2, [
        {a: {**_sure(Morphology("spiral"))[a], **p.get(a, {})} for a in ATTRIBUTES}
        for p in probs], fractions)
    assert cal["bar"]["vote_mse"] == 0.0 and cal["bar"]["vote_pairs"] == 1
    # the majority's bar frequencies are among spirals already: not divided again
    given = question_predictions(probs, fractions, given_type=True)[0]
    assert given["bar"][:, 0].tolist() == [0.4, 0.4]


def test_vote_targets_follow_each_rule_set_and_records_keep_what_both_need():
    ref = {(t.attribute, t.label): t for t in vote_targets("reference")}
    tree = {(t.attribute, t.label): t for t in vote_targets("tree")}
    bulge = ("prominent_bulge", "yes")
    assert ref[bulge].columns == (col("bulge-size", "obvious"),) and ref[bulge].given is None
    assert tree[bulge].columns == (col("bulge-size", "obvious"), col("bulge-size", "dominant"))
    assert tree[bulge].given == ("spiral",)
    assert ("type", "artifact") in tree and ("type", "artifact") not in ref
    assert tree[("boxy_bulge", "yes")].given == ("edge-on disk",)
    kept = set(vote_record_columns())
    assert {col("bulge-size", "dominant"), col("disk-edge-on", "no"),
            col("has-spiral-arms", "yes"), col("smooth-or-featured", "featured-or-disk"),
            votes_col("bar"), votes_col("smooth-or-featured")} <= kept


def test_calibration_table_prints_auroc_and_vote_mse():
    cal = calibration(TRUTHS, [_sure(t) for t in TRUTHS],
                      [{col("smooth-or-featured", "smooth"): float(t.type == "elliptical")}
                       for t in TRUTHS])
    text = format_calibration([{"name": "m", "grammar": {"calibration": cal}}])
    line = next(ln for ln in text.splitlines() if ln.startswith("m (grammar)") and " type " in ln)
    assert line.split()[-3:] == ["1.000", "0.0000", "4"]
    assert "Zoobot" in text and format_calibration([{"name": "x"}]) == ""


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
    assert loaded_by(("galaxy_llava.metrics", "galaxy_llava.calibration"),
                     ("torch", "transformers", "galaxy_llava.models")) == []
