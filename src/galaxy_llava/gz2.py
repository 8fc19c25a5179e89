"""The Galaxy Zoo 2 decision tree, as data: questions, answers, which answer opens which question,
and the catalogue's column names. The one home of the tree: rules, votes and tests read it here.

A volunteer starts at :data:`ROOT`; each answer in :data:`LEADS_TO` opens further questions, and
every classification ends with :data:`LAST` unless an answer in :data:`STOPS` ended it first (a
star or artifact is not a galaxy, so nothing more is asked). A question few volunteers reached
has a fraction resting on few votes, and one nobody reached has NaN fractions.
"""

from __future__ import annotations

from typing import Mapping

# Questions and their answers, in the catalogue's order.
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


def share(count, total):
    """``count / total`` in float64, NaN where ``total`` is 0 or missing: a vote fraction from
    vote counts (scalars or numpy arrays). Exact where the catalogue's float32 fraction is not:
    24 of 40 votes is 0.6 here, while ``float32(0.6)`` is 0.6000000238."""
    import numpy as np

    count = np.asarray(count, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total > 0, count / np.where(total > 0, total, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def asked_columns(question: str) -> tuple[str, ...]:
    """The fraction columns :func:`asked_share` reads for ``question``: the answers on every
    path from the root to it."""
    out: list[str] = []
    for q, a in reached_by(question):
        out += [col(q, a), *asked_columns(q)]
    return tuple(dict.fromkeys(out))


def asked_share(fractions: Mapping[str, float | None], question: str) -> float:
    """The share of a galaxy's volunteers who were asked ``question``, from the vote fractions
    of the answers that lead to it: the product of the fractions along the tree (summed over
    the answers that open it). This is Zoobot's ``prob_of_asked``
    (``zoobot/shared/schemas.py`` ``Schema.joint_p``, used by ``zoobot/shared/stats.py``
    ``get_expected_votes_human``), walked over this module's tree rather than Zoobot's GZ2
    schema, which asks bar and bulge-size after featured-or-disk and something-odd always. NaN
    where a fraction it needs is missing on a branch that volunteers reached."""
    if question == ROOT:
        return 1.0
    total = 0.0
    for q, a in reached_by(question):
        parent = asked_share(fractions, q)
        if parent == 0:  # nobody reached q: its fractions are NaN, and no one came this way
            continue
        value = fractions.get(col(q, a))
        total += (float("nan") if value is None else float(value)) * parent
    return total
