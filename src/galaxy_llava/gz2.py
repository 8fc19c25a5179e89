"""The Galaxy Zoo 2 decision tree, as data: questions, answers, which answer opens which question,
and the catalogue's column names. The one home of the tree: rules, votes and tests read it here.

A volunteer starts at :data:`ROOT`; each answer in :data:`LEADS_TO` opens further questions, and
every classification ends with :data:`LAST` unless an answer in :data:`STOPS` ended it first (a
star or artifact is not a galaxy, so nothing more is asked). A question few volunteers reached
has a fraction resting on few votes, and one nobody reached has NaN fractions.
"""

from __future__ import annotations

from typing import Mapping

# Questions and their answers, in the catalogue's (and domain.md's) order.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "smooth-or-featured": ("smooth", "featured-or-disk", "artifact"),
    "disk-edge-on": ("yes", "no"),
    "has-spiral-arms": ("yes", "no"),
    "bar": ("yes", "no"),
    "bulge-size": ("dominant", "obvious", "just-noticeable", "no"),
    "something-odd": ("yes", "no"),
    "how-rounded": ("round", "in-between", "cigar"),
    "bulge-shape": ("round", "boxy", "no-bulge"),
    "spiral-winding": ("tight", "medium", "loose"),
    "spiral-arm-count": ("1", "2", "3", "4", "more-than-4", "cant-tell"),
}
ROOT = "smooth-or-featured"
# (question, answer) -> the questions that answer opens, in the order a volunteer meets them.
LEADS_TO: dict[tuple[str, str], tuple[str, ...]] = {
    (ROOT, "smooth"): ("how-rounded",),
    (ROOT, "featured-or-disk"): ("disk-edge-on",),
    ("disk-edge-on", "yes"): ("bulge-shape",),
    ("disk-edge-on", "no"): ("bar", "has-spiral-arms", "bulge-size"),
    ("has-spiral-arms", "yes"): ("spiral-winding", "spiral-arm-count"),
}
# Asked at the end of every classification, whichever branch it took...
LAST = "something-odd"
# ...except one these answers ended at once.
STOPS: frozenset[tuple[str, str]] = frozenset({(ROOT, "artifact")})


def col(question: str, answer: str) -> str:
    """Name of the vote-fraction column of one answer, e.g. ``bar-gz2_yes_fraction``: the share
    of the question's votes (not of all votes) that chose this answer."""
    return f"{question}-gz2_{answer}_fraction"


def votes_col(question: str) -> str:
    """Name of the total-votes column of one question: how many volunteers reached it."""
    return f"{question}-gz2_total-votes"


def count_col(question: str, answer: str) -> str:
    """Name of the vote-count column of one answer, e.g. ``bar-gz2_yes``."""
    return f"{question}-gz2_{answer}"


def vote_columns() -> list[str]:
    """Every GZ2 vote column, in catalogue order: per question its counts, total, fractions."""
    return [c for q, answers in QUESTIONS.items()
            for c in [count_col(q, a) for a in answers] + [votes_col(q)]
            + [col(q, a) for a in answers]]


def reached_by(question: str) -> tuple[tuple[str, str], ...]:
    """The (question, answer) pairs whose voters are asked ``question`` next, so its total votes
    are the sum of those answers' counts; the root is reached by every volunteer (empty tuple)."""
    if question not in QUESTIONS:
        raise KeyError(f"unknown GZ2 question {question!r}")
    if question == LAST:  # everyone who answered the root without being stopped gets here
        return tuple((ROOT, a) for a in QUESTIONS[ROOT] if (ROOT, a) not in STOPS)
    return tuple(pair for pair, opened in LEADS_TO.items() if question in opened)


def _walk(question: str) -> list[str]:
    out = [question]
    for answer in QUESTIONS[question]:
        for nxt in LEADS_TO.get((question, answer), ()):
            out += _walk(nxt)
    return out


# Every question in the order a volunteer meets it: depth first from the root, LAST at the end.
ASK_ORDER: tuple[str, ...] = tuple(_walk(ROOT)) + (LAST,)


def n_asked(question: str, n_volunteers: int, counts: Mapping[str, Mapping[str, int]]) -> int:
    """How many of ``n_volunteers`` are asked ``question``, given the answer counts
    (``{question: {answer: n}}``) of the questions met before it in :data:`ASK_ORDER`."""
    if question == ROOT:
        return n_volunteers
    return sum(counts[q][a] for q, a in reached_by(question))
