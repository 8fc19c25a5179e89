"""Metrics on hand-made cases (numbers worked out by hand or by scikit-learn's own functions):
accuracy, macro-F1, hallucination and omission, Wilson intervals, the collapse warning and the
table. Calibration is tested in test_calibration.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from galaxy_llava.metrics import (TABLE_LEGEND, attribute_metrics, collapse_warning,
                                  format_table, labels_of, majority_labels, predictors,
                                  read_answer, score_captions, score_morphologies,
                                  wilson_interval)
from galaxy_llava.morphology import ATTRIBUTES, Morphology

# Four galaxies: 5 true non-default values in all (round shape, prominent bulge; disturbed;
# bar, two arms), galaxy 4 is the plain spiral.
TRUTHS = [
    Morphology("elliptical", shape="round", prominent_bulge=True),
    Morphology("elliptical", disturbed=True),
    Morphology("spiral", bar=True, arms="2"),
    Morphology("spiral"),
]
PLAIN_SPIRAL = "This is an image of a spiral galaxy."


def test_perfect_predictor_scores_one_everywhere():
    m = score_captions(TRUTHS, [t.caption() for t in TRUTHS])
    assert m["n"] == 4
    for key in ("exact_match", "parse_rate"):
        assert m[key] == 1.0
    assert m["hallucination_rate"] == 0.0 and m["omission_rate"] == 0.0
    for a in ATTRIBUTES:
        assert m["attributes"][a]["accuracy"] == 1.0, a
        assert m["attributes"][a]["macro_f1"] == 1.0, a
    assert m["mean_length"] == m["truth_mean_length"]
    assert m["counts"]["asserted"] == m["counts"]["true_attributes"] == 5


def test_always_plain_spiral_known_numbers():
    m = score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)
    att = {a: m["attributes"][a] for a in ATTRIBUTES}
    assert att["type"]["accuracy"] == 0.5
    # elliptical F1 = 0 (never predicted), spiral F1 = 2*2/(2*2+2+0) = 2/3
    assert att["type"]["macro_f1"] == pytest.approx(1 / 3)
    assert (att["shape"]["n"], att["shape"]["accuracy"]) == (2, 0.5)  # ellipticals only
    assert (att["bar"]["n"], att["bar"]["accuracy"]) == (2, 0.5)  # spirals only
    assert (att["arms"]["n"], att["arms"]["accuracy"]) == (2, 0.5)
    assert att["prominent_bulge"]["accuracy"] == 0.75
    assert att["boxy_bulge"]["accuracy"] == 1.0 and att["boxy_bulge"]["n"] == 4
    assert att["disturbed"]["accuracy"] == 0.75
    assert m["exact_match"] == 0.25  # only the plain spiral
    assert m["parse_rate"] == 1.0
    assert m["hallucination_rate"] is None  # nothing asserted: the rate cannot apply
    assert m["omission_rate"] == 1.0  # all 5 true values missed
    assert m["mean_length"] == 8.0


def test_always_empty_known_numbers():
    m = score_captions(TRUTHS, [""] * 4)
    for a in ATTRIBUTES:  # not a caption: wrong everywhere, no credit for "not said" defaults
        assert m["attributes"][a]["accuracy"] == 0.0, a
        assert m["attributes"][a]["confusion"]["labels"][-1] == "unknown"
    assert m["exact_match"] == 0.0 and m["parse_rate"] == 0.0
    assert m["hallucination_rate"] is None and m["omission_rate"] == 1.0
    assert m["mean_length"] == 0.0


def test_empty_and_unparseable_answers_are_counted():
    m = score_captions(TRUTHS, ["", None, "A fuzzy blob, with arms.", PLAIN_SPIRAL + " It is red."])
    assert m["n"] == 4
    assert m["parse_rate"] == 0.25  # text after the full stop is ignored by the grammar
    att = m["attributes"]
    assert "unknown" in att["type"]["confusion"]["labels"]
    assert att["type"]["accuracy"] == 0.25  # only galaxy 4 (spiral) right
    assert att["shape"]["accuracy"] == 0.0  # galaxies 1, 2: no answer
    assert att["bar"]["accuracy"] == 0.5  # galaxy 4 right, galaxy 3 no answer
    assert att["boxy_bulge"]["accuracy"] == 0.25
    assert m["exact_match"] == 0.25
    assert m["counts"]["asserted"] == 0 and m["omission_rate"] == 1.0
    labels, ok, _ = read_answer("")
    assert set(labels.values()) == {"unknown"} and ok is False
    # a garbage phrase makes the answer unparsed but the recognised phrases still count
    labels, ok, _ = read_answer("This is an image of a spiral galaxy, with a central bar, sparkly.")
    assert ok is False and labels["type"] == "spiral" and labels["bar"] == "yes"
    assert labels["arms"] == "none"


def test_hallucination_and_omission_counts():
    preds = [
        "This is an image of an elliptical galaxy, nearly round in shape, disturbed or merging "
        "with another galaxy.",  # round right; disturbed hallucinated; prominent bulge omitted
        "This is an image of an elliptical galaxy, disturbed or merging with another galaxy.",
        "This is an image of a spiral galaxy, with three arms.",  # arms wrong; bar omitted
        "This is an image of a spiral galaxy, boxy bulge at its center.",  # boxy hallucinated
    ]
    m = score_captions(TRUTHS, preds)
    # asserted: round, disturbed | disturbed | 3 arms | boxy = 5; wrong: disturbed, 3 arms, boxy
    assert m["counts"]["asserted"] == 5 and m["counts"]["hallucinated"] == 3
    assert m["hallucination_rate"] == pytest.approx(3 / 5)
    # true: round, bulge | disturbed | bar, 2 arms = 5; missed: bulge, bar, arms
    assert m["counts"]["omitted"] == 3
    assert m["omission_rate"] == pytest.approx(3 / 5)
    assert m["exact_match"] == 0.25


def test_confusion_matrix_rows_truth_columns_prediction():
    a = attribute_metrics(["yes", "yes", "no", "no", "no"], ["yes", "no", "no", "yes", "no"],
                          ("no", "yes"))
    assert a["confusion"] == {"labels": ["no", "yes"], "matrix": [[2, 1], [1, 1]]}
    assert a["accuracy"] == pytest.approx(3 / 5)
    # F1(no) = 4/(4+1+1), F1(yes) = 2/(2+1+1)
    assert a["macro_f1"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    empty = attribute_metrics([], [], ("no", "yes"))
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["macro_f1"] is None


def test_caption_free_predictions_have_null_text_fields():
    m = score_morphologies(TRUTHS, TRUTHS)
    assert m["parse_rate"] is None and m["mean_length"] is None
    assert m["exact_match"] == 1.0 and m["hallucination_rate"] == 0.0
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere


def test_majority_labels_per_applicable_subset():
    train = [Morphology("spiral", bar=True), Morphology("spiral", bar=True), Morphology("spiral"),
             Morphology("elliptical", shape="cigar")]
    maj = majority_labels(train)
    assert maj["type"] == "spiral" and maj["bar"] == "yes"
    assert maj["shape"] == "cigar"  # the only elliptical's shape, not the spirals' "none"
    assert maj["disturbed"] == "no"
    assert labels_of(Morphology("spiral", arms="many"))["arms"] == "many"


def test_format_table_shows_percent_and_dashes():
    m = {"name": "probe", **score_morphologies(TRUTHS, TRUTHS)}
    text = format_table([m, {"name": "plain", **score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)}])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "n", "type"]
    assert "100.0%" in lines[2] and "-" in lines[2].split()
    assert "50.0%" in lines[3] and "8.0" in lines[3]


# ------------------------------------------------------------------ intervals

def test_wilson_interval_known_values():
    # 5 of 10: the textbook Wilson 95% interval (0.2366, 0.7634)
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    # 0 of n: closed form [0, z^2 / (n + z^2)], z = 1.95996
    z2 = 1.959964 ** 2
    assert wilson_interval(0, 10) == pytest.approx([0.0, z2 / (10 + z2)], abs=1e-6)
    # any k: centre and half-width of Wilson's formula
    k, n = 37, 52
    p = k / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    assert wilson_interval(k, n) == pytest.approx([centre - half, centre + half], abs=1e-6)
    assert wilson_interval(0, 0) is None


def test_every_accuracy_carries_its_wilson_interval():
    m = score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)
    assert m["exact_match_ci"] == pytest.approx(wilson_interval(1, 4))
    shape = m["attributes"]["shape"]
    assert shape["accuracy_ci"] == pytest.approx(wilson_interval(1, 2))
    lo, hi = m["attributes"]["prominent_bulge"]["accuracy_ci"]
    assert lo < 0.75 < hi


def test_macro_f1_is_sklearns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c"], 40).tolist()
    pred = rng.choice(["a", "b", "d"], 40).tolist()
    got = attribute_metrics(truth, pred, ("a", "b", "c", "d"))["macro_f1"]
    assert got == pytest.approx(f1_score(truth, pred, average="macro"))


# ------------------------------------------------------------------ collapse

def test_collapse_warning():
    truths = TRUTHS  # four distinct captions
    one = collapse_warning([PLAIN_SPIRAL] * 4, truths)
    assert one is not None and "\n" not in one
    assert "4 answers collapse to 1 distinct caption while the truth has 4" in one
    two = collapse_warning([PLAIN_SPIRAL, "", PLAIN_SPIRAL, ""], [t.caption() for t in truths],
                           what="captions")
    assert "4 captions collapse to 2 distinct captions" in two
    assert collapse_warning([t.caption() for t in TRUTHS[:3]] + [PLAIN_SPIRAL], truths) is None
    assert collapse_warning([PLAIN_SPIRAL] * 4, [TRUTHS[0], TRUTHS[1]] * 2) is None  # 2 truths
    assert collapse_warning([], []) is None


# ------------------------------------------------------------------ table

def test_format_table_adds_the_grammar_row_and_a_legend():
    beam = score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)
    grammar = score_captions(TRUTHS, [t.caption() for t in TRUTHS])
    lines = format_table([{"name": "lora", **beam, "grammar": grammar}]).splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["lora", "lora"]
    assert lines[3].startswith("lora (grammar)") and "100.0%" in lines[3]
    assert lines[-1] == TABLE_LEGEND
    for word in ("parse", "halluc", "omission"):
        assert f"{word}:" in TABLE_LEGEND
    assert [n for n, _ in predictors([{"name": "x", **beam}])] == ["x"]


def test_a_probes_vote_regressions_are_a_predictor_of_their_own():
    labels = score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)
    votes = score_captions(TRUTHS, [t.caption() for t in TRUTHS])
    found = predictors([{"name": "probe", **labels, "votes": votes},
                        {"name": "p2", **labels, "votes": None}])
    assert [n for n, _ in found] == ["probe", "probe (votes)", "p2"]
    lines = format_table([{"name": "probe", **labels, "votes": votes}]).splitlines()
    assert lines[3].startswith("probe (votes)") and "100.0%" in lines[3]
    assert "(votes):" in TABLE_LEGEND
