"""How well the predictors' probabilities are calibrated: pure functions, no torch.

Predictors that give probabilities (the VLM's grammar marginals, :func:`grammar_probabilities`;
the probe's ``predict_proba``; the majority's training-set frequencies,
:func:`majority_probabilities`) give one ``{attribute: {label: p}}`` per galaxy, in the labels of
:mod:`galaxy_llava.metrics`. :func:`calibration` scores them per attribute, over the galaxies
where the attribute applies (as accuracy is): Brier score, expected calibration error with its
reliability-diagram bins and AUROC (binary on p(yes) for a yes/no attribute, from log-odds so
that probabilities saturated at 1.0 cannot tie). Where the records carry GZ2 vote fractions,
:func:`zoobot_vote_mse` compares each attribute's probability, made conditional on its GZ2
question being asked, with the volunteers' vote fraction, over the galaxies at least half of
whose volunteers were asked the question (Zoobot's measure; :func:`question_predictions`).
numpy and scikit-learn only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from galaxy_llava import gz2
from galaxy_llava.gz2 import col, votes_col
from galaxy_llava.metrics import APPLIES, LABELS, UNKNOWN, labels_of, majority_labels, predictors
from galaxy_llava.morphology import ATTRIBUTES, SHAPES, Morphology
from galaxy_llava.rules import _ARM_ANSWERS  # the caption's arm labels -> GZ2 answers, one home
from galaxy_llava.rules import RULE_SETS, rule_set

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# The labels a probability can go to (an "unknown" answer has no probability).
PROB_LABELS = {a: tuple(x for x in LABELS[a] if x != UNKNOWN) for a in ATTRIBUTES}
ECE_BINS = 10
# Attributes a caption states for one galaxy type only (the others are stated for any type).
STATED_FOR = {"shape": "elliptical", "bar": "spiral", "arms": "spiral"}
# Zoobot masks the questions fewer than half of a galaxy's volunteers were asked.
MIN_ASKED = 0.5
# The GZ2 question each attribute is read from, and the answers each of its labels stands for
# (their fractions summed). Labels without a GZ2 answer of their own ("spiral", a shape or arm
# count "none", a "no") are left out. A rule set compares a label with the answers it reads
# (:func:`vote_targets`): a prominent bulge is "obvious" under the reference rules and
# "obvious" or "dominant" under the tree rules.
VOTE_ANSWERS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "type": ("smooth-or-featured", {"elliptical": ("smooth",), "artifact": ("artifact",)}),
    "shape": ("how-rounded", {s: (s,) for s in SHAPES}),
    "bar": ("bar", {"yes": ("yes",)}),
    "arms": ("spiral-arm-count", {label: (answer,) for label, answer in _ARM_ANSWERS}),
    "prominent_bulge": ("bulge-size", {"yes": ("obvious", "dominant")}),
    "boxy_bulge": ("bulge-shape", {"yes": ("boxy",)}),
    "disturbed": ("something-odd", {"yes": ("yes",)}),
}


@dataclass(frozen=True)
class VoteTarget:
    """One attribute label compared with the volunteers: its GZ2 ``question``, the fraction
    ``columns`` summed into its vote fraction, and the galaxy types whose probabilities it is
    stated under (``given``; None: any type), by which it is divided to be conditional on the
    question being asked, as Zoobot's predictions are."""

    attribute: str
    label: str
    question: str
    columns: tuple[str, ...]
    given: tuple[str, ...] | None


def vote_targets(rules: str = "reference") -> list[VoteTarget]:
    """The labels a rule set's probabilities are compared with vote fractions for: the answers
    of :data:`VOTE_ANSWERS` that the rule set reads, for labels its captions can state."""
    ruleset = rule_set(rules)
    reachable = [(m.type, labels_of(m)) for m in ruleset.reachable()]
    all_types = {t for t, _ in reachable}
    out = []
    for a, (question, labels) in VOTE_ANSWERS.items():
        for label, answers in labels.items():
            columns = tuple(col(question, x) for x in answers if col(question, x) in
                            ruleset.columns)
            types = {t for t, lab in reachable if lab[a] == label}
            if not columns or not types:
                continue
            given = None if a == "type" or types == all_types else tuple(sorted(types))
            out.append(VoteTarget(a, label, question, columns, given))
    return out


def vote_record_columns() -> tuple[str, ...]:
    """The catalogue columns a prepared record keeps so that every rule set's vote MSE can be
    computed: the fractions compared, those on the tree's path to each question (for the share
    of volunteers asked) and each question's total votes."""
    fractions, totals = [], []
    for name in RULE_SETS:
        for t in vote_targets(name):
            fractions += [*t.columns, *gz2.asked_columns(t.question)]
            totals += [votes_col(t.question)] + [votes_col(q) for q, _ in
                                                 gz2.reached_by(t.question)]
    return tuple(dict.fromkeys(fractions)) + tuple(dict.fromkeys(totals))


def grammar_probabilities(marginals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The grammar scorer's per-attribute marginals (:mod:`galaxy_llava.scoring` names booleans
    ``true``/``false``) in this module's labels (``yes``/``no``)."""
    rename = {"true": "yes", "false": "no"}
    return {a: {rename.get(v, v): float(p) for v, p in marginals[a].items()} for a in ATTRIBUTES}


def _matrix(truth: Sequence[str], probs: Sequence[dict[str, float]], labels: Sequence[str]):
    """(truth as column indices, ``(n, k)`` probabilities, the column labels): ``labels`` first,
    then any other label met in truth or probabilities."""
    import numpy as np

    extra = sorted(({t for t in truth} | {x for p in probs for x in p}) - set(labels))
    cols = list(labels) + extra
    index = {x: i for i, x in enumerate(cols)}
    p = np.array([[float(row.get(x, 0.0)) for x in cols] for row in probs]).reshape(-1, len(cols))
    p = np.clip(p, 0.0, 1.0)  # sums of posteriors can round to 1 + 4e-16
    return np.array([index[t] for t in truth], dtype=int), p, cols


def brier_score(truth: Sequence[str], probs: Sequence[dict[str, float]],
                labels: Sequence[str]) -> float | None:
    """Multiclass Brier score (Brier 1950; scikit-learn's ``brier_score_loss`` with
    ``scale_by_half=False``): the mean over galaxies of the sum over labels of
    ``(p_label - [label is true])**2``; 0 is perfect, 2 the worst (for a yes/no attribute twice
    the binary score). None without galaxies."""
    if not truth:
        return None
    from sklearn.metrics import brier_score_loss

    y, p, cols = _matrix(truth, probs, labels)
    order = sorted(range(len(cols)), key=lambda i: cols[i])  # the column order sklearn assumes
    return float(brier_score_loss([cols[i] for i in y], p[:, order],
                                  labels=[cols[i] for i in order], scale_by_half=False))


def reliability(truth: Sequence[str], probs: Sequence[dict[str, float]], labels: Sequence[str],
                bins: int = ECE_BINS) -> dict:
    """Top-label expected calibration error and its reliability-diagram bins.

    Each galaxy's confidence is its highest probability and it is right when that label (the
    first in ``labels`` order on a tie) is the truth. Confidences fall into ``bins`` equal-width
    bins ``(b/B, (b+1)/B]`` (0 goes to the first); ECE = sum over bins of (share of galaxies in the
    bin) * |accuracy - mean confidence|, so 0 means the confidence is the accuracy. Returns
    ``{"ece", "count", "confidence", "accuracy"}`` (per bin; null where a bin is empty)."""
    import numpy as np

    empty = {"ece": None, "count": [0] * bins, "confidence": [None] * bins,
             "accuracy": [None] * bins}
    if not truth:
        return empty
    y, p, _ = _matrix(truth, probs, labels)
    conf, right = p.max(axis=1), (p.argmax(axis=1) == y)
    # rounded first so that a confidence of exactly 0.7 falls in (0.6, 0.7], not above
    which = np.clip(np.ceil(np.round(conf * bins, 9)).astype(int) - 1, 0, bins - 1)
    out = dict(empty, count=[int((which == b).sum()) for b in range(bins)])
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            out["confidence"][b] = float(conf[inside].mean())
            out["accuracy"][b] = float(right[inside].mean())
            ece += inside.mean() * abs(out["accuracy"][b] - out["confidence"][b])
    out["ece"] = float(ece)
    return out


def _log_odds(p, k: int):
    """log p_k - log(sum of the other labels' p): ranks galaxies as p_k does, but a label
    saturated at p = 1.0 (its complement below float resolution) is still told apart by its
    complement, which the separately summed other labels keep."""
    import numpy as np

    rest = np.delete(p, k, axis=1).sum(axis=1)
    tiny = np.finfo(float).tiny
    return np.log(np.maximum(p[:, k], tiny)) - np.log(np.maximum(rest, tiny))


def auroc(truth: Sequence[str], probs: Sequence[dict[str, float]],
          labels: Sequence[str]) -> float | None:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``). A yes/no attribute gets the
    binary AUROC of "yes"; other attributes one-vs-rest, macro-averaged over the labels present
    in the truth. Galaxies are ranked by each label's log-odds (:func:`_log_odds`), not by a
    probability that saturates at 1.0 and ties: for p(yes) below 1 that is the ranking of
    ``roc_auc_score(y, p_yes)`` itself. None when the truth has fewer than two labels, where
    it is undefined."""
    y, p, cols = _matrix(truth, probs, labels)
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    if set(labels) == {"no", "yes"} and set(cols) == {"no", "yes"}:
        yes = cols.index("yes")
        return float(roc_auc_score(y == yes, _log_odds(p, yes)))
    return float(sum(roc_auc_score(y == k, _log_odds(p, k)) for k in present) / len(present))


def zoobot_vote_mse(predicted: Mapping[str, "ArrayLike"], fractions: Mapping[str, "ArrayLike"],
                    asked: Mapping[str, "ArrayLike"], min_asked: float = MIN_ASKED) -> dict:
    """Zoobot's vote-fraction error: per GZ2 question, the mean squared difference between the
    predicted probability of each answer *given that the question is asked* and the answer's
    vote fraction, over the galaxies at least ``min_asked`` of whose volunteers were asked the
    question (``prob_of_asked >= 0.5``: ``zoobot/shared/load_predictions.py`` masks the
    fractions so, with ``prob_of_asked`` from ``zoobot/shared/stats.py``
    ``get_expected_votes_human``; the vote-fraction regression errors of Zoobot's evaluation,
    ``get_regression_errors`` in ``zoobot/tensorflow/evaluation/evaluate_model.py`` before
    commit 5c96aa4, use the same mask).

    ``predicted`` and ``fractions``: ``{question: (n, k) array}`` over the same ``k`` answers
    (or groups of answers) of the question, NaN where there is no prediction or no vote;
    ``asked``: ``{question: (n,) array}``, the share of each galaxy's volunteers who were asked
    it (:func:`galaxy_llava.gz2.asked_share`). Only questions present in all three count.
    Returns ``{"mse", "pairs", "questions": {question: {"mse", "pairs", "galaxies"}}}``: ``mse``
    over all (galaxy, answer) pairs kept, None where none is."""
    import numpy as np

    out: dict = {"mse": None, "pairs": 0, "questions": {}}
    total = 0.0
    for q in predicted:
        if q not in fractions or q not in asked:
            continue
        pred = np.asarray(predicted[q], dtype=np.float64)
        frac = np.asarray(fractions[q], dtype=np.float64)
        pred, frac = (x[:, None] if x.ndim == 1 else x for x in (pred, frac))
        if pred.shape != frac.shape:
            raise ValueError(f"{q}: predictions {pred.shape} but fractions {frac.shape}")
        share = np.asarray(asked[q], dtype=np.float64).reshape(-1)
        with np.errstate(invalid="ignore"):
            kept = (share >= min_asked)[:, None] & np.isfinite(pred) & np.isfinite(frac)
        err = float(((pred - frac)[kept] ** 2).sum())
        n = int(kept.sum())
        out["questions"][q] = {"mse": err / n if n else None, "pairs": n,
                               "galaxies": int(kept.any(axis=1).sum())}
        total += err
        out["pairs"] += n
    if out["pairs"]:
        out["mse"] = total / out["pairs"]
    return out


def question_predictions(probs: Sequence[dict[str, dict[str, float]]],
                         fractions: Sequence[Mapping[str, float | None] | None],
                         rules: str = "reference", given_type: bool = False
                         ) -> tuple[dict, dict, dict, dict[str, list[VoteTarget]]]:
    """The three inputs of :func:`zoobot_vote_mse` from the predictors' attribute probabilities
    and the records' vote fractions, plus the targets of each question.

    A caption states bar and arms only for spirals (shape for ellipticals; under the tree rules
    a boxy bulge for edge-on disks...), so an attribute's probability is joint with its type:
    p(bar) = p(spiral) p(bar | spiral). Divided by the probability of the types it is stated
    under (:class:`VoteTarget` ``given``), it is conditional on the question being asked, which
    is what a vote fraction measures. ``given_type``: the probabilities of the attributes in
    :data:`STATED_FOR` are conditional on their type already (the majority baseline's
    frequencies among that type's galaxies)."""
    import numpy as np

    targets: dict[str, list[VoteTarget]] = {}
    for t in vote_targets(rules):
        targets.setdefault(t.question, []).append(t)
    nan = math.nan
    predicted, observed, asked = {}, {}, {}
    for q, ts in targets.items():
        pred = np.full((len(probs), len(ts)), nan)
        frac = np.full((len(probs), len(ts)), nan)
        for i, (p, f) in enumerate(zip(probs, fractions)):
            f = f or {}
            for j, t in enumerate(ts):
                value = p.get(t.attribute, {}).get(t.label, 0.0)
                if t.given and not (given_type and t.attribute in STATED_FOR):
                    under = sum(p.get("type", {}).get(x, 0.0) for x in t.given)
                    value = value / under if under > 0 else nan
                pred[i, j] = min(value, 1.0)  # a sum of posteriors can round above 1
                values = [f.get(c) for c in t.columns]
                if all(v is not None for v in values):
                    frac[i, j] = sum(values)
        predicted[q], observed[q] = pred, frac
        asked[q] = np.array([gz2.asked_share(f or {}, q) for f in fractions])
    return predicted, observed, asked, targets


def calibration(truths: Sequence[Morphology], probs: Sequence[dict[str, dict[str, float]]],
                fractions: Sequence[dict | None] | None = None, rules: str = "reference",
                given_type: bool = False) -> dict:
    """Per attribute, over the galaxies where it applies (judged by the truth, as accuracy is):
    ``n``, ``brier``, ``ece`` with its ``reliability`` bins and ``auroc``; with ``fractions``
    (the records' GZ2 vote fractions), Zoobot's ``vote_mse`` of the attribute's question over
    ``vote_pairs`` (galaxy, answer) pairs of every galaxy at least half of whose volunteers were
    asked it (:func:`zoobot_vote_mse`; ``rules``: the rule set the captions follow).
    ``probs``: one ``{attribute: {label: p}}`` per galaxy, each attribute's probabilities
    summing to 1 (``given_type``: see :func:`question_predictions`)."""
    if len(truths) != len(probs):
        raise ValueError(f"{len(truths)} truths but {len(probs)} probability rows")
    votes = None
    if fractions is not None:
        votes = zoobot_vote_mse(*question_predictions(probs, fractions, rules, given_type)[:3])
    tl = [labels_of(t) for t in truths]
    out = {}
    for a in ATTRIBUTES:
        idx = [i for i, t in enumerate(truths) if APPLIES[a](t)]
        truth, p = [tl[i][a] for i in idx], [probs[i][a] for i in idx]
        rel = reliability(truth, p, PROB_LABELS[a])
        question = VOTE_ANSWERS[a][0]
        q = (votes or {}).get("questions", {}).get(question) or {}
        out[a] = {"n": len(idx), "brier": brier_score(truth, p, PROB_LABELS[a]),
                  "ece": rel.pop("ece"), "auroc": auroc(truth, p, PROB_LABELS[a]),
                  "vote_mse": q.get("mse"), "vote_pairs": q.get("pairs", 0),
                  "vote_question": question,
                  "reliability": {"bins": ECE_BINS, **rel}}
    return out


def format_calibration(metrics_list: Sequence[dict]) -> str:
    """A plain-text table of every predictor's calibration (``calibration`` of each
    ``metrics.json``, and of its ``grammar``): per attribute n, Brier, ECE, AUROC and Zoobot's
    vote MSE with its pairs; "-" where undefined. Empty when no predictor has probabilities."""
    rows = [["predictor", "attribute", "n", "Brier", "ECE", "AUROC", "vote MSE", "pairs"]]
    for name, m in predictors(metrics_list):
        cal = m.get("calibration") or {}
        for a in ATTRIBUTES:
            c = cal.get(a)
            if not c:
                continue
            num = [None if c.get(k) is None else f"{c[k]:.{d}f}"
                   for k, d in (("brier", 3), ("ece", 3), ("auroc", 3), ("vote_mse", 4))]
            rows.append([name, a, str(c.get("n", "")), *[v or "-" for v in num],
                         str(c.get("vote_pairs", 0))])
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [CALIBRATION_LEGEND])


CALIBRATION_LEGEND = (
    "Brier 0 best, 2 worst; ECE top-label, 10 bins; AUROC binary on p(yes) for yes/no "
    "attributes, else one-vs-rest macro; vote MSE: Zoobot's, p(answer | question asked) vs the "
    "vote fraction where >= half the volunteers were asked, over 'pairs' (galaxy, answer)")


def majority_probabilities(train_truths: Iterable[Morphology]) -> dict[str, dict[str, float]]:
    """The majority baseline's probabilities: each attribute's training-set label frequencies
    among the galaxies where it applies (the same galaxies :func:`majority_labels` counts)."""
    train_truths = list(train_truths)
    out = {}
    for a in ATTRIBUTES:
        counts = Counter(labels_of(t)[a] for t in train_truths if APPLIES[a](t))
        total = sum(counts.values())
        out[a] = ({x: counts[x] / total for x in LABELS[a] if counts[x]} if total
                  else {majority_labels([])[a]: 1.0})
    return out
