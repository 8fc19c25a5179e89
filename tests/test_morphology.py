"""Caption rules and grammar: the reference rules match the notebook, parsing inverts rendering."""

import math
import random

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy_llava.morphology import (
    ATTRIBUTES,
    REFERENCE_COLUMNS,
    TREE_COLUMNS,
    Morphology,
    caption_from_fractions,
    col,
    morphology_from_fractions,
    parse_caption,
    reachable_morphologies,
    required_columns,
    votes_col,
)
from notebook_oracle import notebook_describe

# Values straddling every threshold, NaN included (NaN must add nothing).
EDGE_VALUES = [math.nan, 0.0, 0.4, 0.4000001, 0.5, 0.5000001, 0.6, 0.6000001, 0.9, 1.0]


def random_row(rng: random.Random) -> pd.Series:
    return pd.Series({c: rng.choice(EDGE_VALUES) for c in TREE_COLUMNS})


def test_reference_rules_equal_notebook_on_edge_values():
    rng = random.Random(0)
    for _ in range(3000):
        row = random_row(rng)
        assert caption_from_fractions(row) == notebook_describe(row)


def test_reference_rules_accept_plain_dicts_with_none():
    row = {c: None for c in REFERENCE_COLUMNS}
    row[col("smooth-or-featured", "smooth")] = 0.7
    assert caption_from_fractions(row) == "This is an image of an elliptical galaxy."


def test_notebook_examples():
    row = {c: math.nan for c in REFERENCE_COLUMNS}
    assert caption_from_fractions(row) == "This is an image of a spiral galaxy."
    row.update({col("smooth-or-featured", "smooth"): 0.8, col("how-rounded", "in-between"): 0.7,
                col("bulge-size", "obvious"): 0.6, col("bulge-shape", "boxy"): 0.9,
                col("something-odd", "yes"): 0.5})
    assert caption_from_fractions(row) == (
        "This is an image of an elliptical galaxy, moderately elongated in shape, prominent bulge "
        "at its center, boxy bulge at its center, disturbed or merging with another galaxy.")


@pytest.mark.parametrize("rules", ["reference", "tree"])
def test_round_trip_every_reachable_morphology(rules):
    reachable = reachable_morphologies(rules)
    assert len(set(reachable)) == len(reachable)
    for m in reachable:
        assert parse_caption(m.caption()) == m


@pytest.mark.parametrize("rules", ["reference", "tree"])
def test_rules_only_produce_reachable_morphologies(rules):
    reachable = set(reachable_morphologies(rules))
    rng = random.Random(1)
    seen = set()
    for _ in range(5000):
        row = random_row(rng)
        for q in ("smooth-or-featured", "how-rounded", "bar", "has-spiral-arms", "disk-edge-on",
                  "bulge-size", "bulge-shape", "spiral-arm-count", "something-odd"):
            row[votes_col(q)] = rng.choice([math.nan, 0, 1, 5, 30])
        m = morphology_from_fractions(row, rules)
        assert m in reachable
        seen.add(m)
    assert len(seen) > len(reachable) // 3


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(reachable_morphologies("tree") + reachable_morphologies("reference")),
       st.sampled_from([str.upper, str.lower, str.title, lambda s: s]),
       st.sampled_from(["", "  ", " And then some extra words", "\n"]))
def test_parse_tolerates_case_spacing_and_trailing_text(m, case, tail):
    text = case(m.caption()).replace(", ", " ,   ") + tail
    assert parse_caption(text) == m


def test_parse_reports_what_it_could_not_parse():
    m = parse_caption("This is an image of a spiral galaxy, with two arms, glowing brightly")
    assert m.type == "spiral" and m.arms == "2"
    assert m.unparsed == ("glowing brightly",) and not m.parsed_ok
    # truncated phrase (the notebook's max_new_tokens cut-off)
    m = parse_caption("This is an image of an elliptical galaxy, disturbed or merging with another galax")
    assert not m.parsed_ok and not m.disturbed
    # a conflicting second value is not silently taken
    m = parse_caption("This is an image of a spiral galaxy, with two arms, with three arms.")
    assert m.arms == "2" and m.unparsed == ("with three arms",)
    assert not parse_caption("").parsed_ok
    assert not parse_caption("The image is a close-up view of a star.").parsed_ok


def test_tree_rules_ignore_stray_votes_and_name_edge_on_disks():
    row = {c: math.nan for c in TREE_COLUMNS}
    row.update({col("smooth-or-featured", "smooth"): 0.9, votes_col("smooth-or-featured"): 40,
                col("something-odd", "yes"): 1.0, votes_col("something-odd"): 1,
                col("bulge-size", "obvious"): 1.0, votes_col("bulge-size"): 1,
                col("how-rounded", "round"): 0.8, votes_col("how-rounded"): 35})
    assert caption_from_fractions(row, "reference") == (
        "This is an image of an elliptical galaxy, nearly round in shape, "
        "prominent bulge at its center, disturbed or merging with another galaxy.")
    assert caption_from_fractions(row, "tree") == (
        "This is an image of an elliptical galaxy, nearly round in shape.")
    edge = {c: math.nan for c in TREE_COLUMNS}
    edge.update({col("smooth-or-featured", "smooth"): 0.1, votes_col("smooth-or-featured"): 40,
                 col("smooth-or-featured", "artifact"): 0.0,
                 col("disk-edge-on", "yes"): 0.9, votes_col("disk-edge-on"): 36,
                 col("bulge-shape", "boxy"): 0.7, votes_col("bulge-shape"): 30})
    assert caption_from_fractions(edge, "tree") == (
        "This is an image of an edge-on disk galaxy, boxy bulge at its center.")
    assert parse_caption(caption_from_fractions(edge, "tree")).type == "edge-on disk"


def test_required_columns_and_bad_rules():
    assert set(REFERENCE_COLUMNS) <= set(required_columns("tree"))
    with pytest.raises(ValueError, match="unknown rule set"):
        required_columns("nope")
    with pytest.raises(ValueError, match="unknown galaxy type"):
        Morphology(type="irregular")


def test_dict_round_trip():
    for m in reachable_morphologies("tree"):
        d = m.to_dict()
        assert tuple(d) == ATTRIBUTES
        assert Morphology.from_dict(d) == m
    with pytest.raises(ValueError, match="unknown morphology keys"):
        Morphology.from_dict({"type": "spiral", "colour": "red"})
