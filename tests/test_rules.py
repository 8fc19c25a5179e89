"""Caption rule sets: the reference rules equal the notebook, the tree rules follow the GZ2 tree,
and the registry is the one place a rule set is named (catalogue, prepare, CLI and synthetic
truth all look it up)."""

import math
import random

import numpy as np
import pandas as pd
import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import QUESTIONS, col, votes_col
from galaxy_llava.morphology import Morphology, parse_caption
from galaxy_llava.rules import (
    REFERENCE_COLUMNS,
    RULE_SETS,
    TREE_COLUMNS,
    RuleSet,
    caption_from_fractions,
    morphology_from_fractions,
    rule_set,
)
from conftest import loaded_by
from notebook_oracle import notebook_describe

# Values straddling every threshold, NaN included (NaN must add nothing).
EDGE_VALUES = [math.nan, 0.0, 0.4, 0.4000001, 0.5, 0.5000001, 0.6, 0.6000001, 0.9, 1.0]
EVERY_COLUMN = sorted({c for r in RULE_SETS.values() for c in r.columns})


def random_row(rng: random.Random) -> pd.Series:
    """Fractions on the thresholds, and vote totals around min_votes, for every column read."""
    return pd.Series({c: rng.choice([math.nan, 0, 1, 5, 30] if c.endswith("votes")
                                    else EDGE_VALUES) for c in EVERY_COLUMN})


# ---------------------------------------------------------------- reference

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


# ---------------------------------------------------------------- tree

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
    # With min_votes 1 the one "odd" vote counts; the bulge is still off the elliptical branch.
    assert caption_from_fractions(row, "tree", min_votes=1) == (
        "This is an image of an elliptical galaxy, nearly round in shape, "
        "disturbed or merging with another galaxy.")
    edge = {c: math.nan for c in TREE_COLUMNS}
    edge.update({col("smooth-or-featured", "smooth"): 0.1, votes_col("smooth-or-featured"): 40,
                 col("smooth-or-featured", "artifact"): 0.0,
                 col("disk-edge-on", "yes"): 0.9, votes_col("disk-edge-on"): 36,
                 col("bulge-shape", "boxy"): 0.7, votes_col("bulge-shape"): 30})
    assert caption_from_fractions(edge, "tree") == (
        "This is an image of an edge-on disk galaxy, boxy bulge at its center.")


# ---------------------------------------------------------------- every registered rule set

@pytest.mark.parametrize("name", list(RULE_SETS))
def test_reachable_morphologies_round_trip_through_caption_and_parse(name):
    reachable = RULE_SETS[name].reachable()
    assert len(set(reachable)) == len(reachable)
    for m in reachable:
        assert parse_caption(m.caption()) == m


@pytest.mark.parametrize("name", list(RULE_SETS))
def test_rules_only_produce_reachable_morphologies(name):
    reachable = set(RULE_SETS[name].reachable())
    rng = random.Random(1)
    seen = set()
    for _ in range(5000):
        m = morphology_from_fractions(random_row(rng), name)
        assert m in reachable
        seen.add(m)
    assert len(seen) > len(reachable) // 3


class _Recording(dict):
    """A row that remembers which columns were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("name", list(RULE_SETS))
def test_columns_are_exactly_what_the_rules_read(name):
    """The catalogue loads ``columns`` only, so the rules must need no other (and every one is
    read for some row, so none is loaded for nothing)."""
    rs, rng, read = RULE_SETS[name], random.Random(2), set()
    assert all(c.endswith("_fraction") or c.endswith("_total-votes") for c in rs.columns)
    for _ in range(3000):
        row = _Recording({c: v for c, v in random_row(rng).items() if c in rs.columns})
        rs.morphology(row)  # a column outside rs.columns would be a KeyError here
        read |= row.read
    assert read == set(rs.columns)


def test_min_votes_reaches_only_rule_sets_that_read_it():
    row = {c: math.nan for c in TREE_COLUMNS}
    row.update({col("smooth-or-featured", "smooth"): 0.9, votes_col("smooth-or-featured"): 4})
    for name, rs in RULE_SETS.items():
        results = {rs.morphology(row, min_votes=k).type for k in (0, 5)}
        assert (len(results) == 2) is rs.uses_min_votes, name


def test_unknown_rule_set_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError) as e:
        rule_set("nope")
    msg = str(e.value)
    assert "\n" not in msg and "'nope'" in msg
    assert msg.endswith("known rule sets: " + ", ".join(RULE_SETS))
    for call in (lambda: morphology_from_fractions({}, "nope"), lambda: rule_set(["x"])):
        with pytest.raises(UserError, match="unknown rule set"):
            call()


def test_a_new_rule_set_needs_only_its_registry_entry(monkeypatch, tmp_path):
    """Registering one entry makes a rule set usable by the catalogue, prepare, the CLI and the
    synthetic truth, with nothing else changed."""
    from galaxy_llava.gz2_catalog import load_catalog
    from galaxy_llava.cli import build_parser
    from galaxy_llava.prepare import prepare
    from galaxy_llava.toy.synthetic import draw_truth, truth_morphology
    from test_gz2_catalog import images_for, make_votes, write_hub_parquet

    smooth = col("smooth-or-featured", "smooth")
    plain = RuleSet(
        "plain", (smooth,),
        lambda row: Morphology("elliptical" if row[smooth] > 0.6 else "spiral"),
        lambda: [Morphology("elliptical"), Morphology("spiral")])
    monkeypatch.setitem(RULE_SETS, "plain", plain)

    assert build_parser().parse_args(
        ["prepare", "--source", "s", "--out", "o", "--rules", "plain"]).rules == "plain"
    truth = draw_truth(np.random.default_rng(0))
    assert truth_morphology(truth, "plain") in plain.reachable()
    df = make_votes(12, seed=1, n_elliptical=6)
    src = write_hub_parquet(df, images_for(df), tmp_path / "src")
    assert list(load_catalog(src, rules="plain").votes.columns) == ["id_str", smooth]
    stats = prepare(src, tmp_path / "out", n_per_class=4, image_size=16, rules="plain",
                    workers=1)
    assert stats["morphology_types"] == {"elliptical": 4, "spiral": 4}
    assert stats["manifest"]["min_votes"] is None  # plain does not read min_votes


def test_cli_offers_exactly_the_registered_rule_sets():
    from galaxy_llava.cli import build_parser

    parser = build_parser()
    for name in RULE_SETS:
        args = parser.parse_args(["prepare", "--source", "s", "--out", "o", "--rules", name])
        assert args.rules == name
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--source", "s", "--out", "o", "--rules", "nope"])


def test_domain_modules_import_no_model_code():
    """gz2, rules and morphology stay importable without torch or transformers (a fresh
    interpreter: the test session itself has torch loaded)."""
    assert loaded_by(("galaxy_llava.gz2", "galaxy_llava.rules", "galaxy_llava.morphology"),
                     ("torch", "transformers")) == []


def test_reference_columns_are_gz2_answers():
    answers = {col(q, a) for q, ans in QUESTIONS.items() for a in ans}
    assert set(REFERENCE_COLUMNS) <= answers
    assert set(REFERENCE_COLUMNS) <= set(TREE_COLUMNS)
