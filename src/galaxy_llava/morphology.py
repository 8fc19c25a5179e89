"""Galaxy Zoo 2 vote fractions -> morphology attributes -> caption, and back.

Pure functions, no I/O. Two rule sets build a :class:`Morphology` from one catalogue row:

* ``reference`` reproduces the seed notebook's ``describe()`` exactly (strict ``>``; a NaN
  fraction compares false and so adds nothing).
* ``tree`` follows the GZ2 decision tree: it only asks a question on the branch where volunteers
  were asked it, ignores fractions backed by fewer than ``min_votes`` votes, and names edge-on
  disks and artifacts instead of calling them spirals.

Both render through one caption grammar, which :func:`parse_caption` inverts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

RULE_SETS = ("reference", "tree")
ATTRIBUTES = ("type", "shape", "bar", "arms", "prominent_bulge", "boxy_bulge", "disturbed")
TYPES = ("elliptical", "spiral", "edge-on disk", "artifact")
SHAPES = ("round", "in-between", "cigar")
ARMS = ("2", "3", "many")

# The caption grammar: one opening clause naming the type, then attribute phrases in a fixed
# order, joined by ", " and closed by ".".
TYPE_PHRASES = {
    "elliptical": "This is an image of an elliptical galaxy",
    "spiral": "This is an image of a spiral galaxy",
    "edge-on disk": "This is an image of an edge-on disk galaxy",
    "artifact": "This is an image of a star or artifact",
}
SHAPE_PHRASES = {
    "round": "nearly round in shape",
    "in-between": "moderately elongated in shape",
    "cigar": "highly elongated in shape",
}
BAR_PHRASE = "with a central bar"
ARM_PHRASES = {"2": "with two arms", "3": "with three arms", "many": "with many arms"}
PROMINENT_BULGE_PHRASE = "prominent bulge at its center"
BOXY_BULGE_PHRASE = "boxy bulge at its center"
DISTURBED_PHRASE = "disturbed or merging with another galaxy"


def col(question: str, answer: str) -> str:
    """Name of the GZ2 vote-fraction column for one answer, e.g. ``bar-gz2_yes_fraction``."""
    return f"{question}-gz2_{answer}_fraction"


def votes_col(question: str) -> str:
    """Name of the GZ2 total-votes column of one question."""
    return f"{question}-gz2_total-votes"


# Fraction columns each rule set reads; the catalogue validates against these.
REFERENCE_COLUMNS = (
    col("smooth-or-featured", "smooth"),
    col("how-rounded", "round"),
    col("how-rounded", "in-between"),
    col("how-rounded", "cigar"),
    col("bar", "yes"),
    col("spiral-arm-count", "2"),
    col("spiral-arm-count", "3"),
    col("spiral-arm-count", "more-than-4"),
    col("bulge-size", "obvious"),
    col("bulge-shape", "boxy"),
    col("something-odd", "yes"),
)
TREE_QUESTIONS = (
    "smooth-or-featured", "disk-edge-on", "has-spiral-arms", "bar", "bulge-size",
    "something-odd", "how-rounded", "bulge-shape", "spiral-arm-count",
)
TREE_COLUMNS = tuple(dict.fromkeys(REFERENCE_COLUMNS + (
    col("smooth-or-featured", "artifact"),
    col("disk-edge-on", "yes"),
    col("has-spiral-arms", "yes"),
    col("bulge-size", "dominant"),
))) + tuple(votes_col(q) for q in TREE_QUESTIONS)


def required_columns(rules: str = "reference") -> tuple[str, ...]:
    """Catalogue columns the named rule set reads."""
    _check_rules(rules)
    return REFERENCE_COLUMNS if rules == "reference" else TREE_COLUMNS


@dataclass(frozen=True)
class Morphology:
    """The attributes a caption states. ``unparsed`` holds caption text the grammar did not match."""

    type: str = "spiral"
    shape: str | None = None
    bar: bool = False
    arms: str | None = None
    prominent_bulge: bool = False
    boxy_bulge: bool = False
    disturbed: bool = False
    unparsed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown galaxy type {self.type!r}; expected one of {TYPES}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.arms is not None and self.arms not in ARMS:
            raise ValueError(f"unknown arm count {self.arms!r}; expected one of {ARMS}")

    @property
    def parsed_ok(self) -> bool:
        """True when the whole caption was inside the grammar."""
        return not self.unparsed

    def to_dict(self) -> dict[str, Any]:
        """The attributes as a JSON-ready dict (without ``unparsed``)."""
        d = asdict(self)
        d.pop("unparsed")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Morphology":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown morphology keys: {sorted(extra)}")
        d = dict(d)
        if "unparsed" in d:
            d["unparsed"] = tuple(d["unparsed"])
        return cls(**d)

    def caption(self) -> str:
        """Render the attributes with the caption grammar."""
        parts = [TYPE_PHRASES[self.type]]
        if self.shape:
            parts.append(SHAPE_PHRASES[self.shape])
        if self.bar:
            parts.append(BAR_PHRASE)
        if self.arms:
            parts.append(ARM_PHRASES[self.arms])
        if self.prominent_bulge:
            parts.append(PROMINENT_BULGE_PHRASE)
        if self.boxy_bulge:
            parts.append(BOXY_BULGE_PHRASE)
        if self.disturbed:
            parts.append(DISTURBED_PHRASE)
        return ", ".join(parts) + "."


def _check_rules(rules: str) -> None:
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; expected one of {RULE_SETS}")


def _frac(row: Mapping[str, Any], column: str) -> float:
    """A fraction as float; None/NaN become NaN so every comparison is false, like pandas."""
    value = row[column]
    if value is None:
        return math.nan
    return float(value)


def reference_morphology(row: Mapping[str, Any]) -> Morphology:
    """The seed notebook's ``describe()`` rules, as attributes."""
    f = lambda q, a: _frac(row, col(q, a))  # noqa: E731
    if f("smooth-or-featured", "smooth") > 0.6:
        galaxy_type, bar, arms = "elliptical", False, None
        shape = next((s for s in SHAPES if f("how-rounded", s) > 0.5), None)
    else:
        galaxy_type, shape = "spiral", None
        bar = f("bar", "yes") > 0.5
        arms = next((a for a, ans in (("2", "2"), ("3", "3"), ("many", "more-than-4"))
                     if f("spiral-arm-count", ans) > 0.5), None)
    return Morphology(
        type=galaxy_type, shape=shape, bar=bar, arms=arms,
        prominent_bulge=f("bulge-size", "obvious") > 0.5,
        boxy_bulge=f("bulge-shape", "boxy") > 0.5,
        disturbed=f("something-odd", "yes") > 0.4,
    )


def tree_morphology(row: Mapping[str, Any], min_votes: int = 5) -> Morphology:
    """GZ2 decision-tree rules: each question is read only on its branch and only when at
    least ``min_votes`` volunteers answered it, so one stray vote cannot add an attribute."""

    def f(question: str, answer: str) -> float:
        votes = _frac(row, votes_col(question))
        if not votes >= min_votes:  # NaN votes count as none
            return math.nan
        return _frac(row, col(question, answer))

    disturbed = f("something-odd", "yes") > 0.4
    if f("smooth-or-featured", "smooth") > 0.6:
        shape = next((s for s in SHAPES if f("how-rounded", s) > 0.5), None)
        return Morphology(type="elliptical", shape=shape, disturbed=disturbed)
    if f("smooth-or-featured", "artifact") > 0.5:
        return Morphology(type="artifact")
    if f("disk-edge-on", "yes") > 0.5:
        return Morphology(type="edge-on disk", boxy_bulge=f("bulge-shape", "boxy") > 0.5,
                          disturbed=disturbed)
    arms = None
    if f("has-spiral-arms", "yes") > 0.5:
        arms = next((a for a, ans in (("2", "2"), ("3", "3"), ("many", "more-than-4"))
                     if f("spiral-arm-count", ans) > 0.5), None)
    # "dominant" is a larger bulge than "obvious": both are prominent.
    bulge = f("bulge-size", "obvious") + f("bulge-size", "dominant")
    return Morphology(type="spiral", bar=f("bar", "yes") > 0.5, arms=arms,
                      prominent_bulge=bulge > 0.5, disturbed=disturbed)


def morphology_from_fractions(row: Mapping[str, Any], rules: str = "reference",
                              min_votes: int = 5) -> Morphology:
    """Attributes of one catalogue row (a dict, pandas Series or similar) under a rule set."""
    _check_rules(rules)
    if rules == "reference":
        return reference_morphology(row)
    return tree_morphology(row, min_votes=min_votes)


def caption_from_fractions(row: Mapping[str, Any], rules: str = "reference",
                           min_votes: int = 5) -> str:
    """Caption of one catalogue row; with ``rules="reference"`` equal to the notebook's."""
    return morphology_from_fractions(row, rules, min_votes).caption()


def is_elliptical(smooth_fraction: float) -> bool:
    """The selection class rule shared by both rule sets (smooth fraction > 0.6)."""
    return smooth_fraction > 0.6


# ---------------------------------------------------------------- parsing

def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


_TYPE_BY_PHRASE = {_norm(p): t for t, p in TYPE_PHRASES.items()}
# phrase -> (attribute, value)
_PHRASES: dict[str, tuple[str, Any]] = {
    **{_norm(p): ("shape", s) for s, p in SHAPE_PHRASES.items()},
    _norm(BAR_PHRASE): ("bar", True),
    **{_norm(p): ("arms", a) for a, p in ARM_PHRASES.items()},
    _norm(PROMINENT_BULGE_PHRASE): ("prominent_bulge", True),
    _norm(BOXY_BULGE_PHRASE): ("boxy_bulge", True),
    _norm(DISTURBED_PHRASE): ("disturbed", True),
}


def parse_caption(text: str) -> Morphology:
    """Invert the caption grammar, tolerant of case, spacing and text after the first full stop.

    Phrases outside the grammar, a missing or unknown type clause, and a second value for an
    attribute already set are listed in ``unparsed``; the result is then not ``parsed_ok``.
    A caption without a type clause defaults to ``spiral`` (the grammar's "else" branch).
    """
    body = _norm(text or "")
    body = body.split(".", 1)[0]  # trailing text after the caption's full stop is ignored
    parts = [p.strip() for p in body.split(",")]
    unparsed: list[str] = []
    values: dict[str, Any] = {}
    first, rest = (parts[0], parts[1:]) if parts else ("", [])
    if first in _TYPE_BY_PHRASE:
        values["type"] = _TYPE_BY_PHRASE[first]
    else:
        unparsed.append(first)
    for part in rest:
        hit = _PHRASES.get(part)
        if hit is None or hit[0] in values:
            unparsed.append(part)
        else:
            values[hit[0]] = hit[1]
    return Morphology(**values, unparsed=tuple(unparsed))


def reachable_morphologies(rules: str = "reference") -> list[Morphology]:
    """Every Morphology a rule set can produce (for property tests and baselines)."""
    _check_rules(rules)
    out: list[Morphology] = []
    flags = [(p, b, d) for p in (False, True) for b in (False, True) for d in (False, True)]
    if rules == "reference":
        for shape in (None, *SHAPES):
            out += [Morphology("elliptical", shape, False, None, p, b, d) for p, b, d in flags]
        for bar in (False, True):
            for arms in (None, *ARMS):
                out += [Morphology("spiral", None, bar, arms, p, b, d) for p, b, d in flags]
        return out
    for shape in (None, *SHAPES):
        out += [Morphology("elliptical", shape, disturbed=d) for d in (False, True)]
    out.append(Morphology("artifact"))
    out += [Morphology("edge-on disk", boxy_bulge=b, disturbed=d)
            for b in (False, True) for d in (False, True)]
    for bar in (False, True):
        for arms in (None, *ARMS):
            out += [Morphology("spiral", None, bar, arms, p, False, d)
                    for p in (False, True) for d in (False, True)]
    return out
