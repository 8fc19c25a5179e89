"""Captions drawn from the volunteers' votes: one caption per draw, distributed as the GZ2 vote
fractions say, so training on fresh draws teaches what volunteers would say rather than one
thresholded label (``train --caption_targets votes``).

A draw is one imagined volunteer: each question the caption grammar reads is answered with the
share of the galaxy's volunteers who gave each answer (a fraction is already conditional on the
question being reached: it is a share of the votes *for that question*), and the answers are
rendered with the rule set's grammar. In expectation, the cross-entropy of a model's captions
against these draws is its cross-entropy against the volunteers.

An unanswered question (its fractions missing or NaN, or, for rule sets that read ``min_votes``,
fewer votes than that) gives what the rule set's own rules give it: the attribute is absent, and
an unanswered branching question takes the rules' "else" branch. A galaxy with every question
unanswered therefore draws the rule set's caption of that galaxy every time.

:data:`SAMPLERS` holds one sampler per rule set of :data:`galaxy_llava.rules.RULE_SETS`; each
reads only that rule set's ``columns``, which ``prepare`` keeps in each record (fractions under
``fractions``, each question's total votes under ``votes``: :func:`record_votes`).
Pure numpy, no torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import ROOT, col, votes_col
from galaxy_llava.morphology import SHAPES, Morphology
from galaxy_llava.rules import _ARM_ANSWERS, rule_set  # arm labels -> GZ2 answers, one home

_ARM_LABEL = {answer: label for label, answer in _ARM_ANSWERS}
_ARM_COUNTS = tuple(answer for _, answer in _ARM_ANSWERS)


def _value(fractions: Mapping[str, Any], column: str) -> float:
    value = fractions.get(column)
    return math.nan if value is None else float(value)


def _pick(fractions: Mapping[str, Any], rng: np.random.Generator, question: str,
          answers: Sequence[str], min_votes: int | None = None) -> str | None:
    """One volunteer's answer to ``question``: each of ``answers`` with its vote fraction, None
    with the rest (the question's other answers). None, without a draw, where the question is
    unanswered: a listed fraction missing or NaN, or (``min_votes`` given) fewer votes."""
    if min_votes is not None and not _value(fractions, votes_col(question)) >= min_votes:
        return None  # NaN votes count as none
    shares = [_value(fractions, col(question, a)) for a in answers]
    if any(math.isnan(s) for s in shares):
        return None
    u, acc = rng.random(), 0.0
    for answer, share in zip(answers, shares):
        acc += share
        if u < acc:
            return answer
    return None


def draw_reference(fractions: Mapping[str, Any], rng: np.random.Generator,
                   min_votes: int = 5) -> Morphology:
    """A draw for the ``reference`` rules (the notebook's ``describe()``; ``min_votes`` unused,
    as there). The reference reads each phrase from one column, and some off the galaxy's
    branch (a "prominent bulge" of an elliptical from bulge-size "obvious"), so no walk of the
    tree gives its captions; instead each attribute it reads is drawn on its own with the
    fraction of the column it reads, conditioned on the type where the reference conditions:
    elliptical with the smooth fraction, else spiral (artifacts included, as in the reference);
    an elliptical's shape from how-rounded; a spiral's bar from bar "yes" and arm count from
    spiral-arm-count 2 / 3 / more-than-4 (other answers: no arm phrase); for every galaxy a
    prominent bulge from bulge-size "obvious", a boxy bulge from bulge-shape "boxy", disturbed
    from something-odd "yes". Each attribute's frequency is then exactly the fraction the
    reference compares with its threshold (0.6 for the type, 0.5 or 0.4 for the rest)."""
    def flag(question: str, answer: str) -> bool:
        return _pick(fractions, rng, question, (answer,)) == answer

    if _pick(fractions, rng, ROOT, ("smooth",)) == "smooth":
        galaxy_type, bar, arms = "elliptical", False, None
        shape = _pick(fractions, rng, "how-rounded", SHAPES)
    else:
        galaxy_type, shape = "spiral", None
        bar = flag("bar", "yes")
        arms = _ARM_LABEL.get(_pick(fractions, rng, "spiral-arm-count", _ARM_COUNTS))
    return Morphology(type=galaxy_type, shape=shape, bar=bar, arms=arms,
                      prominent_bulge=flag("bulge-size", "obvious"),
                      boxy_bulge=flag("bulge-shape", "boxy"),
                      disturbed=flag("something-odd", "yes"))


def draw_tree(fractions: Mapping[str, Any], rng: np.random.Generator,
              min_votes: int = 5) -> Morphology:
    """A draw for the ``tree`` rules: one volunteer walks the GZ2 tree. smooth -> elliptical
    with a how-rounded shape; artifact -> artifact (nothing more is asked); featured ->
    disk-edge-on: yes -> edge-on disk, boxy bulge from bulge-shape "boxy"; no -> spiral, bar
    from bar "yes", arms (if has-spiral-arms "yes") from spiral-arm-count 2 / 3 /
    more-than-4 (other counts: no arm phrase), prominent bulge from bulge-size "obvious" or
    "dominant". Every type but artifact draws something-odd "yes" as disturbed. A question with
    fewer than ``min_votes`` votes is unanswered, as in the tree rules."""
    def pick(question: str, answers: Sequence[str]) -> str | None:
        return _pick(fractions, rng, question, answers, min_votes)

    def flag(question: str, answer: str = "yes") -> bool:
        return pick(question, (answer,)) == answer

    root = pick(ROOT, ("smooth", "artifact"))  # the rest, or unanswered: featured
    if root == "artifact":
        return Morphology(type="artifact")
    disturbed = flag("something-odd")
    if root == "smooth":
        return Morphology(type="elliptical", shape=pick("how-rounded", SHAPES),
                          disturbed=disturbed)
    if flag("disk-edge-on"):
        return Morphology(type="edge-on disk", boxy_bulge=flag("bulge-shape", "boxy"),
                          disturbed=disturbed)
    bar = flag("bar")
    arms = _ARM_LABEL.get(pick("spiral-arm-count", _ARM_COUNTS)) if flag("has-spiral-arms") \
        else None
    prominent = pick("bulge-size", ("dominant", "obvious")) is not None
    return Morphology(type="spiral", bar=bar, arms=arms, prominent_bulge=prominent,
                      disturbed=disturbed)


# Rule set name -> its sampler (fractions, rng, min_votes) -> Morphology.
SAMPLERS: dict[str, Callable[..., Morphology]] = {"reference": draw_reference, "tree": draw_tree}


def draw_morphology(fractions: Mapping[str, Any], rules: str, rng: np.random.Generator,
                    min_votes: int = 5) -> Morphology:
    """One Morphology drawn from a record's vote ``fractions`` (GZ2 column -> value or None)
    under the named rule set; ``min_votes`` reaches rule sets that read it."""
    return _sampler(rules)(fractions, rng, min_votes)


def _sampler(rules: str) -> Callable[..., Morphology]:
    rule_set(rules)  # an unknown name: the registry's one-line error
    if rules not in SAMPLERS:
        raise UserError(f"rule set {rules!r} has no vote sampler; train it with "
                        "--caption_targets caption")
    return SAMPLERS[rules]


def record_votes(record: Mapping[str, Any]) -> dict[str, Any]:
    """A prepared record's vote columns as one mapping: its ``fractions`` and, where the record
    keeps them apart, its ``votes`` (each question's total votes)."""
    return {**(record.get("fractions") or {}), **(record.get("votes") or {})}


def check_records(records: Sequence[Mapping[str, Any]], rules: str) -> None:
    """Refuse, in one line, records that lack a vote column the sampler of ``rules`` reads (a
    hand-made dataset, or one prepared before the columns were kept)."""
    _sampler(rules)
    needed = rule_set(rules).columns
    for k, r in enumerate(records):
        fractions = record_votes(r)
        missing = [c for c in needed if c not in fractions]
        if missing:
            what = "no vote fractions" if not r.get("fractions") else f"no {missing[0]!r}"
            raise UserError(f"record {k} ({r.get('id_str', r.get('image'))}) carries {what}: "
                            f"--caption_targets votes needs the {rules} rules' vote columns; "
                            "prepare the dataset again with `galaxy-llava prepare`")


class VoteCaptions:
    """Captions drawn from records' votes, one per (epoch, index): the draw is seeded by
    ``(seed, epoch, index)`` alone, so any process, worker or resumed run draws the same caption
    for the same galaxy in the same epoch, and a new epoch draws afresh."""

    def __init__(self, records: Sequence[Mapping[str, Any]], rules: str, min_votes: int,
                 seed: int):
        check_records(records, rules)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"--seed must be a non-negative integer (got {seed!r})")
        self.fractions = [record_votes(r) for r in records]
        self.rules, self.min_votes, self.seed = rules, min_votes, seed

    def __len__(self) -> int:
        return len(self.fractions)

    def morphology(self, epoch: int, index: int) -> Morphology:
        """The attributes drawn for galaxy ``index`` in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, index])
        return draw_morphology(self.fractions[index], self.rules, rng, self.min_votes)

    def __call__(self, epoch: int, index: int) -> str:
        """The caption drawn for galaxy ``index`` in ``epoch``."""
        return self.morphology(epoch, index).caption()
