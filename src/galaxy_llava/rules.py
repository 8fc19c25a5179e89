"""Caption rule sets: GZ2 vote fractions of one catalogue row -> :class:`Morphology`.

Rule sets are a registry (:data:`RULE_SETS`); each entry names the catalogue columns it reads,
its function from a row to a Morphology and every Morphology it can produce. Adding a rule set
is one function and one entry here; the catalogue, ``prepare``, the CLI and the synthetic truth
all look rule sets up by name.

* ``reference`` reproduces the seed notebook's ``describe()`` exactly (strict ``>``; a NaN
  fraction compares false and so adds nothing). It compares the stored fractions, as the
  notebook did: the Hub stores them as float32, and ``float32(0.6)`` is 0.6000000238, so a
  galaxy with exactly 24 of 40 smooth votes is "elliptical" here, as it was in the notebook.
* ``tree`` follows the GZ2 decision tree: it only asks a question on the branch where volunteers
  were asked it, ignores fractions backed by fewer than ``min_votes`` votes, and names edge-on
  disks and artifacts instead of calling them spirals. It decides from the vote counts where a
  row holds them (:func:`galaxy_llava.gz2.share`), so 24 of 40 smooth votes is exactly 0.6 and
  not elliptical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import col, count_col, share, votes_col
from galaxy_llava.morphology import ARMS, SHAPES, Morphology

# Arm-count labels of the caption and the GZ2 answers they are read from.
_ARM_ANSWERS = (("2", "2"), ("3", "3"), ("many", "more-than-4"))


def _frac(row: Mapping[str, Any], column: str) -> float:
    """A fraction as float; None/NaN become NaN so every comparison is false, like pandas."""
    value = row[column]
    if value is None:
        return math.nan
    return float(value)


def is_elliptical(smooth_fraction: Any) -> Any:
    """The selection class rule shared by every rule set (smooth fraction > 0.6); works on
    floats and numpy arrays alike, and NaN is not elliptical."""
    return smooth_fraction > 0.6


# ---------------------------------------------------------------- reference

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


def reference_morphology(row: Mapping[str, Any]) -> Morphology:
    """The seed notebook's ``describe()`` rules, as attributes."""
    f = lambda q, a: _frac(row, col(q, a))  # noqa: E731
    if is_elliptical(f("smooth-or-featured", "smooth")):
        galaxy_type, bar, arms = "elliptical", False, None
        shape = next((s for s in SHAPES if f("how-rounded", s) > 0.5), None)
    else:
        galaxy_type, shape = "spiral", None
        bar = f("bar", "yes") > 0.5
        arms = next((a for a, ans in _ARM_ANSWERS if f("spiral-arm-count", ans) > 0.5), None)
    return Morphology(
        type=galaxy_type, shape=shape, bar=bar, arms=arms,
        prominent_bulge=f("bulge-size", "obvious") > 0.5,
        boxy_bulge=f("bulge-shape", "boxy") > 0.5,
        disturbed=f("something-odd", "yes") > 0.4,
    )


def _reference_reachable() -> list[Morphology]:
    """Every Morphology of the reference rules: the bulge and "disturbed" phrases apply to both
    types, shape only to ellipticals, bar and arms only to spirals."""
    flags = [(p, b, d) for p in (False, True) for b in (False, True) for d in (False, True)]
    out = [Morphology("elliptical", shape, False, None, p, b, d)
           for shape in (None, *SHAPES) for p, b, d in flags]
    out += [Morphology("spiral", None, bar, arms, p, b, d)
            for bar in (False, True) for arms in (None, *ARMS) for p, b, d in flags]
    return out


# ---------------------------------------------------------------- tree

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


def tree_morphology(row: Mapping[str, Any], min_votes: int = 5) -> Morphology:
    """GZ2 decision-tree rules: each question is read only on its branch and only when at
    least ``min_votes`` volunteers answered it, so one stray vote cannot add an attribute."""

    def f(question: str, answer: str) -> float:
        votes = _frac(row, votes_col(question))
        if not votes >= min_votes:  # NaN votes count as none
            return math.nan
        count = count_col(question, answer)
        if count in row and row[count] is not None and not math.isnan(float(row[count])):
            return share(row[count], votes)  # exact: the stored fraction may be float32
        return _frac(row, col(question, answer))

    disturbed = f("something-odd", "yes") > 0.4
    if is_elliptical(f("smooth-or-featured", "smooth")):
        shape = next((s for s in SHAPES if f("how-rounded", s) > 0.5), None)
        return Morphology(type="elliptical", shape=shape, disturbed=disturbed)
    if f("smooth-or-featured", "artifact") > 0.5:
        return Morphology(type="artifact")
    if f("disk-edge-on", "yes") > 0.5:
        return Morphology(type="edge-on disk", boxy_bulge=f("bulge-shape", "boxy") > 0.5,
                          disturbed=disturbed)
    arms = None
    if f("has-spiral-arms", "yes") > 0.5:
        arms = next((a for a, ans in _ARM_ANSWERS if f("spiral-arm-count", ans) > 0.5), None)
    # "dominant" is a larger bulge than "obvious": both are prominent.
    bulge = f("bulge-size", "obvious") + f("bulge-size", "dominant")
    return Morphology(type="spiral", bar=f("bar", "yes") > 0.5, arms=arms,
                      prominent_bulge=bulge > 0.5, disturbed=disturbed)


def _tree_reachable() -> list[Morphology]:
    """Every Morphology of the tree rules: one branch per type, each with its own phrases."""
    out = [Morphology("elliptical", shape, disturbed=d)
           for shape in (None, *SHAPES) for d in (False, True)]
    out.append(Morphology("artifact"))
    out += [Morphology("edge-on disk", boxy_bulge=b, disturbed=d)
            for b in (False, True) for d in (False, True)]
    out += [Morphology("spiral", None, bar, arms, p, False, d)
            for bar in (False, True) for arms in (None, *ARMS)
            for p in (False, True) for d in (False, True)]
    return out


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class RuleSet:
    """One caption rule set: the catalogue columns it reads (the catalogue checks and loads
    these), its rule ``function`` (row, plus ``min_votes`` when ``uses_min_votes``) and every
    Morphology it can produce (for round-trip tests, tokenizer corpora and baselines).
    ``reads_counts``: where a row holds an answer's vote count, the rules read count / total
    instead of the stored fraction (the catalogue loads the counts where they exist)."""

    name: str
    columns: tuple[str, ...]
    function: Callable[..., Morphology]
    reachable: Callable[[], list[Morphology]]
    uses_min_votes: bool = False
    reads_counts: bool = False

    def morphology(self, row: Mapping[str, Any], min_votes: int = 5) -> Morphology:
        """Attributes of one catalogue row (a dict, pandas Series or similar); ``min_votes``
        reaches only rule sets that read it."""
        if self.uses_min_votes:
            return self.function(row, min_votes=min_votes)
        return self.function(row)


RULE_SETS: dict[str, RuleSet] = {r.name: r for r in (
    RuleSet("reference", REFERENCE_COLUMNS, reference_morphology, _reference_reachable),
    RuleSet("tree", TREE_COLUMNS, tree_morphology, _tree_reachable, uses_min_votes=True,
            reads_counts=True),
)}


def rule_set(name: str) -> RuleSet:
    """The registered rule set of this name; an unknown name is a one-line UserError naming
    the known ones."""
    try:
        return RULE_SETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UserError(f"unknown rule set {name!r}; known rule sets: "
                        f"{', '.join(RULE_SETS)}") from None


def morphology_from_fractions(row: Mapping[str, Any], rules: str = "reference",
                              min_votes: int = 5) -> Morphology:
    """Attributes of one catalogue row under the named rule set."""
    return rule_set(rules).morphology(row, min_votes)


def caption_from_fractions(row: Mapping[str, Any], rules: str = "reference",
                           min_votes: int = 5) -> str:
    """Caption of one catalogue row; with ``rules="reference"`` equal to the notebook's."""
    return morphology_from_fractions(row, rules, min_votes).caption()
