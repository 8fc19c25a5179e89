"""vote_captions: captions drawn from the votes. Over many draws (fixed seed) each attribute's
frequency equals its vote-implied probability, written out by hand below for each rule set,
within 4 standard errors; unanswered questions give the rule set's own answer."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from conftest import loaded_by
from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import QUESTIONS, col, votes_col
from galaxy_llava.morphology import ATTRIBUTES, value_label
from galaxy_llava.rules import RULE_SETS, morphology_from_fractions
from galaxy_llava.vote_captions import (SAMPLERS, VoteCaptions, check_records, draw_morphology)

N_DRAWS = 20_000


def _row(fracs: dict[str, dict[str, float]], votes: dict[str, float] | None = None) -> dict:
    """A record's ``fractions``: every GZ2 question NaN (None) and 0 votes unless given; a
    given question gets 40 votes unless ``votes`` says otherwise."""
    row: dict = {}
    for q, answers in QUESTIONS.items():
        given = fracs.get(q)
        for a in answers:
            row[col(q, a)] = None if given is None else given.get(a, 0.0)
        row[votes_col(q)] = (votes or {}).get(q, 40 if given is not None else 0)
    return row


# A featured-leaning galaxy with every branch answered.
MIXED = _row({
    "smooth-or-featured": {"smooth": 0.3, "featured-or-disk": 0.6, "artifact": 0.1},
    "how-rounded": {"round": 0.5, "in-between": 0.3, "cigar": 0.2},
    "disk-edge-on": {"yes": 0.25, "no": 0.75},
    "bulge-shape": {"round": 0.4, "boxy": 0.35, "no-bulge": 0.25},
    "bar": {"yes": 0.4, "no": 0.6},
    "has-spiral-arms": {"yes": 0.7, "no": 0.3},
    "spiral-arm-count": {"1": 0.1, "2": 0.4, "3": 0.2, "4": 0.1, "more-than-4": 0.15,
                         "cant-tell": 0.05},
    "bulge-size": {"dominant": 0.1, "obvious": 0.3, "just-noticeable": 0.4, "no": 0.2},
    "something-odd": {"yes": 0.2, "no": 0.8},
})
# A mostly smooth galaxy: the disk branch is NaN (nobody reached it) or rests on 3 votes, the
# arm count is NaN although has-spiral-arms was answered.
NAN_BRANCHES = _row({
    "smooth-or-featured": {"smooth": 0.7, "featured-or-disk": 0.25, "artifact": 0.05},
    "how-rounded": {"round": 0.2, "in-between": 0.6, "cigar": 0.2},
    "disk-edge-on": {"yes": 0.1, "no": 0.9},
    "bar": {"yes": 0.9, "no": 0.1},
    "has-spiral-arms": {"yes": 0.8, "no": 0.2},
    "bulge-size": {"dominant": 0.0, "obvious": 0.6, "just-noticeable": 0.4, "no": 0.0},
    "something-odd": {"yes": 0.45, "no": 0.55},
}, votes={"bar": 3})
ROWS = {"mixed": MIXED, "nan-branches": NAN_BRANCHES}


def _f(row: dict, question: str, answer: str, min_votes: int | None = None) -> float:
    """A fraction as the oracle reads it: 0 where the question is unanswered."""
    v = row[col(question, answer)]
    if v is None or (min_votes is not None and row[votes_col(question)] < min_votes):
        return 0.0
    return v


def tree_oracle(row: dict, min_votes: int = 5) -> dict[str, dict[str, float]]:
    """The vote-implied probability of each attribute value under the tree rules, by hand: the
    product of the fractions along the path; an unanswered question never says "yes"."""
    f = lambda q, a: _f(row, q, a, min_votes)  # noqa: E731
    smooth, artifact = f("smooth-or-featured", "smooth"), f("smooth-or-featured", "artifact")
    featured = 1 - smooth - artifact
    edge = featured * f("disk-edge-on", "yes")
    spiral = featured - edge
    arms = spiral * f("has-spiral-arms", "yes")
    return {
        "type": {"elliptical": smooth, "artifact": artifact, "edge-on disk": edge,
                 "spiral": spiral},
        "shape": {s: smooth * f("how-rounded", s) for s in ("round", "in-between", "cigar")},
        "bar": {"true": spiral * f("bar", "yes")},
        "arms": {"2": arms * f("spiral-arm-count", "2"), "3": arms * f("spiral-arm-count", "3"),
                 "many": arms * f("spiral-arm-count", "more-than-4")},
        "prominent_bulge": {"true": spiral * (f("bulge-size", "obvious")
                                              + f("bulge-size", "dominant"))},
        "boxy_bulge": {"true": edge * f("bulge-shape", "boxy")},
        "disturbed": {"true": (1 - artifact) * f("something-odd", "yes")},
    }


def reference_oracle(row: dict, min_votes: int = 5) -> dict[str, dict[str, float]]:
    """The same for the reference rules: each attribute on its own with the fraction of the
    column the reference reads, conditioned on the type where the reference conditions."""
    f = lambda q, a: _f(row, q, a)  # noqa: E731
    ell = f("smooth-or-featured", "smooth")
    return {
        "type": {"elliptical": ell, "spiral": 1 - ell},
        "shape": {s: ell * f("how-rounded", s) for s in ("round", "in-between", "cigar")},
        "bar": {"true": (1 - ell) * f("bar", "yes")},
        "arms": {"2": (1 - ell) * f("spiral-arm-count", "2"),
                 "3": (1 - ell) * f("spiral-arm-count", "3"),
                 "many": (1 - ell) * f("spiral-arm-count", "more-than-4")},
        "prominent_bulge": {"true": f("bulge-size", "obvious")},
        "boxy_bulge": {"true": f("bulge-shape", "boxy")},
        "disturbed": {"true": f("something-odd", "yes")},
    }


ORACLES = {"tree": tree_oracle, "reference": reference_oracle}


def _draws(row: dict, rules: str, seed: int = 0, n: int = N_DRAWS):
    rng = np.random.default_rng(seed)
    return [draw_morphology(row, rules, rng) for _ in range(n)]


def _within(freq: float, p: float, n: int) -> bool:
    """Within 4 standard errors of a binomial proportion; a probability of 0 or 1 is exact."""
    return abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_every_rule_set_has_a_sampler():
    assert set(SAMPLERS) == set(RULE_SETS)


@pytest.mark.parametrize("rules", ["tree", "reference"])
@pytest.mark.parametrize("name", list(ROWS))
def test_draw_frequencies_equal_the_vote_implied_probabilities(rules, name):
    row = ROWS[name]
    draws = _draws(row, rules)
    expected = ORACLES[rules](row)
    checked = 0
    for attribute, probs in expected.items():
        counts = Counter(value_label(m, attribute) for m in draws)
        for label, p in probs.items():
            freq = counts[label] / len(draws)
            assert _within(freq, p, len(draws)), (attribute, label, freq, p)
            checked += p > 0
    assert checked >= 8  # the rows exercise most attributes, not only zeros


def test_unanswered_questions_are_never_drawn():
    """NAN_BRANCHES: the bar (3 votes < 5) and the arm count (NaN) are never stated under the
    tree rules, although 90% of the bar's few voters said yes."""
    draws = _draws(NAN_BRANCHES, "tree", n=5000)
    assert not any(m.bar or m.arms for m in draws)
    assert any(m.type == "spiral" for m in draws)
    # with min_votes 3 the bar's votes count
    rng = np.random.default_rng(0)
    barred = [draw_morphology(NAN_BRANCHES, "tree", rng, min_votes=3).bar for _ in range(5000)]
    assert 0.1 < np.mean(barred) < 0.3  # featured 0.25 x face-on 0.9 x bar 0.9 = 0.2


def test_reference_draws_attributes_independently():
    """The reference's off-branch phrases are independent draws: P(bulge and disturbed) is
    the product of their fractions (0.3 x 0.2 on MIXED)."""
    draws = _draws(MIXED, "reference")
    joint = np.mean([m.prominent_bulge and m.disturbed for m in draws])
    assert _within(joint, 0.3 * 0.2, len(draws))


@pytest.mark.parametrize("rules", ["tree", "reference"])
def test_with_nothing_answered_every_draw_is_the_rule_set_s_caption(rules):
    empty = _row({})
    want = morphology_from_fractions(empty, rules)
    assert {draw_morphology(empty, rules, np.random.default_rng(s)) for s in range(50)} == {want}


@pytest.mark.parametrize("rules", ["tree", "reference"])
def test_unanimous_votes_draw_the_rule_set_s_caption(rules):
    """Fractions of 0 and 1 leave nothing to chance: every draw is the thresholded caption."""
    row = _row({"smooth-or-featured": {"featured-or-disk": 1.0},
                "disk-edge-on": {"no": 1.0}, "bar": {"yes": 1.0},
                "has-spiral-arms": {"yes": 1.0}, "spiral-arm-count": {"3": 1.0},
                "bulge-size": {"obvious": 1.0}, "something-odd": {"yes": 1.0}})
    want = morphology_from_fractions(row, rules)
    assert want.arms == "3" and want.bar and want.disturbed
    assert {draw_morphology(row, rules, np.random.default_rng(s)) for s in range(50)} == {want}


class _Reads(dict):
    """A dict that records the keys read through ``get``."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("rules", ["tree", "reference"])
def test_samplers_read_only_the_rule_set_s_columns(rules):
    """What prepare keeps in each record (the rule set's columns) is all a draw needs."""
    read: set[str] = set()
    for row in ROWS.values():
        tracked = _Reads(row)
        _draws(tracked, rules, n=2000)
        read |= tracked.read
    assert read <= set(RULE_SETS[rules].columns), read - set(RULE_SETS[rules].columns)


@pytest.mark.parametrize("rules", ["tree", "reference"])
def test_prepared_records_keep_every_column_a_draw_reads(synth_dir, tmp_path, rules):
    """prepare's records (fractions, and the tree rules' totals) hold each column of the rule
    set with the catalogue's value, and draws from them read nothing else."""
    import pandas as pd

    from galaxy_llava.prepare import prepare
    from galaxy_llava.records import load_records

    prepare(synth_dir, tmp_path / "d", n_per_class=6, seed=0, image_size=16, rules=rules,
            workers=1)
    records = load_records(tmp_path / "d")
    check_records(records, rules)  # nothing missing
    catalogue = pd.read_parquet(sorted((synth_dir / "data").glob("*.parquet")))
    catalogue = catalogue.set_index("id_str")
    drawer = VoteCaptions(records, rules, 5, seed=0)
    for r, votes in zip(records, drawer.fractions):
        assert set(votes) >= set(RULE_SETS[rules].columns)
        row = catalogue.loc[r["id_str"]]
        assert all(v == row[c] or (v is None and math.isnan(row[c])) for c, v in votes.items())
        tracked = _Reads(votes)
        for k in range(200):
            draw_morphology(tracked, rules, np.random.default_rng(k))
        assert tracked.read <= set(votes)


def test_vote_captions_are_a_function_of_seed_epoch_and_index():
    records = [{"fractions": {c: MIXED[c] for c in RULE_SETS["tree"].columns}}] * 3
    a = VoteCaptions(records, "tree", 5, seed=1)
    b = VoteCaptions(records, "tree", 5, seed=1)
    grid = [(e, i) for e in range(20) for i in range(3)]
    assert [a(e, i) for e, i in grid] == [b(e, i) for e, i in grid]  # no state: any order
    assert [a(e, i) for e, i in reversed(grid)] == [b(e, i) for e, i in reversed(grid)]
    assert len({a(e, 0) for e in range(20)}) > 3  # each epoch draws afresh
    other = VoteCaptions(records, "tree", 5, seed=2)
    assert [a(e, i) for e, i in grid] != [other(e, i) for e, i in grid]


@pytest.mark.parametrize("fractions, match", [
    (None, "carries no vote fractions"),
    ({}, "carries no vote fractions"),
    ({col("smooth-or-featured", "smooth"): 0.5}, "carries no 'how-rounded"),
])
def test_records_without_the_vote_columns_are_refused_in_one_line(fractions, match):
    with pytest.raises(UserError, match=match) as e:
        check_records([{"image": "a.jpg", "id_str": "g1", "fractions": fractions}], "reference")
    assert "\n" not in str(e.value) and "g1" in str(e.value)


def test_unknown_rule_set_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown rule set"):
        draw_morphology(MIXED, "nope", np.random.default_rng(0))


def test_attributes_cover_the_grammar():
    """The oracles name every attribute, so no attribute goes untested."""
    assert set(tree_oracle(MIXED)) == set(reference_oracle(MIXED)) == set(ATTRIBUTES)


def test_imports_no_model_code():
    """A domain module: importable without torch or transformers (a fresh interpreter)."""
    assert loaded_by("galaxy_llava.vote_captions", ("torch", "transformers")) == []
