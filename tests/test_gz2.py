"""The GZ2 decision tree as data: questions and answers match the catalogue's columns, every
question is reachable from the first, and each answer opens the questions GZ2 asks next."""

import numpy as np
import pytest

from galaxy_llava import gz2

# Every vote-fraction column of the GZ2 catalogue (mwalmsley/gz2), in its order.
CATALOGUE_FRACTIONS = """
smooth-or-featured-gz2_smooth_fraction smooth-or-featured-gz2_featured-or-disk_fraction
smooth-or-featured-gz2_artifact_fraction disk-edge-on-gz2_yes_fraction
disk-edge-on-gz2_no_fraction has-spiral-arms-gz2_yes_fraction has-spiral-arms-gz2_no_fraction
bar-gz2_yes_fraction bar-gz2_no_fraction bulge-size-gz2_dominant_fraction
bulge-size-gz2_obvious_fraction bulge-size-gz2_just-noticeable_fraction bulge-size-gz2_no_fraction
something-odd-gz2_yes_fraction something-odd-gz2_no_fraction how-rounded-gz2_round_fraction
how-rounded-gz2_in-between_fraction how-rounded-gz2_cigar_fraction bulge-shape-gz2_round_fraction
bulge-shape-gz2_boxy_fraction bulge-shape-gz2_no-bulge_fraction spiral-winding-gz2_tight_fraction
spiral-winding-gz2_medium_fraction spiral-winding-gz2_loose_fraction
spiral-arm-count-gz2_1_fraction spiral-arm-count-gz2_2_fraction spiral-arm-count-gz2_3_fraction
spiral-arm-count-gz2_4_fraction spiral-arm-count-gz2_more-than-4_fraction
spiral-arm-count-gz2_cant-tell_fraction
""".split()


def test_every_answer_column_name_matches_the_catalogue():
    assert [gz2.col(q, a) for q, answers in gz2.QUESTIONS.items() for a in answers] == \
        CATALOGUE_FRACTIONS
    assert gz2.votes_col("bar") == "bar-gz2_total-votes"
    assert gz2.count_col("spiral-arm-count", "more-than-4") == "spiral-arm-count-gz2_more-than-4"


def test_vote_columns_are_counts_total_fractions_per_question():
    cols = gz2.vote_columns()
    assert len(cols) == len(set(cols)) == sum(2 * len(a) + 1 for a in gz2.QUESTIONS.values())
    assert cols[:7] == ["smooth-or-featured-gz2_smooth", "smooth-or-featured-gz2_featured-or-disk",
                        "smooth-or-featured-gz2_artifact", "smooth-or-featured-gz2_total-votes",
                        *CATALOGUE_FRACTIONS[:3]]
    assert [c for c in cols if c.endswith("_fraction")] == CATALOGUE_FRACTIONS


def test_every_question_is_reachable_from_the_first():
    seen, todo = set(), [gz2.ROOT]
    while todo:
        q = todo.pop()
        seen.add(q)
        todo += [n for a in gz2.QUESTIONS[q] for n in gz2.LEADS_TO.get((q, a), ()) if n not in seen]
    assert seen | {gz2.LAST} == set(gz2.QUESTIONS)
    assert gz2.reached_by(gz2.LAST)  # and the last question is reached by someone


def test_tree_is_well_formed():
    for (q, a), opened in gz2.LEADS_TO.items():
        assert a in gz2.QUESTIONS[q], (q, a)
        assert opened and set(opened) <= set(gz2.QUESTIONS) - {gz2.ROOT, gz2.LAST}
    for q, a in gz2.STOPS:
        assert a in gz2.QUESTIONS[q] and (q, a) not in gz2.LEADS_TO
    # a tree: every question but the root and the last is opened by exactly one answer
    for q in set(gz2.QUESTIONS) - {gz2.ROOT, gz2.LAST}:
        assert len(gz2.reached_by(q)) == 1, q
    assert gz2.reached_by(gz2.ROOT) == ()
    with pytest.raises(KeyError, match="unknown GZ2 question"):
        gz2.reached_by("colour")


@pytest.mark.parametrize("question, answer, opens", [
    ("smooth-or-featured", "smooth", ("how-rounded",)),
    ("smooth-or-featured", "featured-or-disk", ("disk-edge-on",)),
    ("smooth-or-featured", "artifact", ()),
    ("disk-edge-on", "yes", ("bulge-shape",)),
    ("disk-edge-on", "no", ("bar", "has-spiral-arms", "bulge-size")),
    ("has-spiral-arms", "yes", ("spiral-winding", "spiral-arm-count")),
    ("has-spiral-arms", "no", ()),
    ("how-rounded", "round", ()),
])
def test_branch_rules(question, answer, opens):
    assert gz2.LEADS_TO.get((question, answer), ()) == opens


def test_every_galaxy_is_asked_something_odd_unless_it_is_an_artifact():
    assert gz2.LAST == "something-odd"
    assert gz2.reached_by("something-odd") == (("smooth-or-featured", "smooth"),
                                               ("smooth-or-featured", "featured-or-disk"))
    assert ("smooth-or-featured", "artifact") in gz2.STOPS


def test_ask_order_meets_each_question_once_after_those_that_open_it():
    order = gz2.ASK_ORDER
    assert sorted(order) == sorted(gz2.QUESTIONS) and order[0] == gz2.ROOT
    assert order[-1] == gz2.LAST
    for q in order:
        assert all(order.index(p) < order.index(q) for p, _ in gz2.reached_by(q)), q


def test_n_asked_sums_the_answers_that_lead_to_a_question():
    counts = {"smooth-or-featured": {"smooth": 10, "featured-or-disk": 25, "artifact": 5},
              "disk-edge-on": {"yes": 5, "no": 20}, "has-spiral-arms": {"yes": 12, "no": 8}}
    asked = {q: gz2.n_asked(q, 40, counts) for q in gz2.ASK_ORDER}
    assert asked == {"smooth-or-featured": 40, "how-rounded": 10, "disk-edge-on": 25,
                     "bulge-shape": 5, "bar": 20, "has-spiral-arms": 20, "spiral-winding": 12,
                     "spiral-arm-count": 12, "bulge-size": 20,
                     "something-odd": 35}  # the 5 artifact votes end there


def test_share_is_exact_where_float32_is_not():
    assert gz2.share(24, 40) == 0.6 and not gz2.share(24, 40) > 0.6
    assert float(np.float32(0.6)) > 0.6  # what the Hub's float32 column holds
    assert np.isnan(gz2.share(0, 0)) and np.isnan(gz2.share(3, np.nan))
    np.testing.assert_array_equal(gz2.share(np.array([1, 2]), np.array([4, 0])), [0.25, np.nan])


def test_asked_share_is_the_product_of_fractions_down_the_tree():
    """Zoobot's prob_of_asked: for a tree-consistent galaxy it is the question's total votes
    over the root's."""
    from test_gz2_catalog import counted_votes

    df = counted_votes(20, seed=8)
    root = df[gz2.votes_col(gz2.ROOT)]
    for q in gz2.QUESTIONS:
        got = np.array([gz2.asked_share(row, q) for row in df.to_dict("records")])
        want = (df[gz2.votes_col(q)] / root).to_numpy()
        np.testing.assert_allclose(np.nan_to_num(got), want, atol=1e-6)  # float32 fractions
    f = {gz2.col(gz2.ROOT, "featured-or-disk"): 0.8, gz2.col("disk-edge-on", "no"): 0.5}
    assert gz2.asked_share(f, "bar") == pytest.approx(0.4)
    assert np.isnan(gz2.asked_share({}, "bar"))  # a fraction it needs is missing
    assert gz2.asked_columns("spiral-arm-count") == (
        gz2.col("has-spiral-arms", "yes"), gz2.col("disk-edge-on", "no"),
        gz2.col(gz2.ROOT, "featured-or-disk"))
