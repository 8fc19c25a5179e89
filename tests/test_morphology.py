"""Caption grammar: every Morphology renders to a caption that parses back to it, parsing is
tolerant of case, spacing and trailing text, and what it cannot read is reported."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy_llava.morphology import (
    ARMS,
    ATTRIBUTES,
    SHAPES,
    TYPES,
    Morphology,
    Phrase,
    caption_phrases,
    has_type_clause,
    parse_caption,
)

# Every Morphology the grammar can state, reachable by a rule set or not.
EVERY = [Morphology(t, s, b, a, p, x, d)
         for t, s, b, a, p, x, d in itertools.product(
             TYPES, (None, *SHAPES), (False, True), (None, *ARMS), (False, True), (False, True),
             (False, True))]


def test_every_morphology_round_trips_through_its_caption():
    assert len(set(m.caption() for m in EVERY)) == len(EVERY)  # no two share a caption
    for m in EVERY:
        assert parse_caption(m.caption()) == m


def test_phrases_are_the_caption_and_say_what_they_state():
    m = Morphology("spiral", bar=True, arms="many", disturbed=True)
    phrases = m.phrases()
    assert ", ".join(p.text for p in phrases) + "." == m.caption()
    assert [(p.attribute, p.value) for p in phrases] == [
        ("type", "spiral"), ("bar", True), ("arms", "many"), ("disturbed", True)]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(EVERY),
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
    assert not parse_caption(None).parsed_ok
    assert not parse_caption("The image is a close-up view of a star.").parsed_ok


def test_caption_phrases_keep_the_text_as_written():
    phrases, rest = caption_phrases("THIS is an image of a  Spiral galaxy , With a central bar, "
                                    "purple, with a central bar. And more")
    assert phrases == [Phrase("THIS is an image of a  Spiral galaxy", "type", "spiral"),
                       Phrase("With a central bar", "bar", True),
                       Phrase("purple", None),
                       Phrase("with a central bar", None)]  # said twice: read once
    assert rest == " And more"


@pytest.mark.parametrize("text, typed", [
    ("This is an image of a star or artifact.", True),
    ("  this IS an image of an edge-on disk galaxy, boxy bulge at its center", True),
    ("With a central bar, This is an image of a spiral galaxy.", False),  # type clause not first
    ("", False),
    (None, False),
])
def test_has_type_clause_only_for_a_leading_type_clause(text, typed):
    assert has_type_clause(text) is typed
    # the parser agrees: without a leading type clause the first phrase is unparsed
    assert bool(parse_caption(text).unparsed) is not typed


def test_dict_round_trip_and_validation():
    for m in EVERY:
        d = m.to_dict()
        assert tuple(d) == ATTRIBUTES
        assert Morphology.from_dict(d) == m
    with pytest.raises(ValueError, match="unknown morphology keys"):
        Morphology.from_dict({"type": "spiral", "colour": "red"})
    with pytest.raises(ValueError, match="unknown galaxy type"):
        Morphology(type="irregular")
