"""How well the predictors' probabilities are calibrated: pure functions, no torch.

Predictors that give probabilities (the VLM's grammar marginals, :func:`grammar_probabilities`;
the probe's ``predict_proba``; the majority's training-set frequencies,
:func:`majority_probabilities`) give one ``{attribute: {label: p}}`` per galaxy, in the labels of
:mod:`galaxy_llava.metrics`. :func:`calibration` scores them per attribute, over the galaxies
where the attribute applies (as accuracy is): Brier score, expected calibration error with its
reliability-diagram bins, AUROC and, where the records carry GZ2 vote fractions, the squared
error against the volunteers' fractions (Zoobot's measure). numpy and scikit-learn only.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from galaxy_llava.gz2 import col
from galaxy_llava.metrics import APPLIES, LABELS, UNKNOWN, labels_of, majority_labels
from galaxy_llava.morphology import ATTRIBUTES, SHAPES, Morphology
from galaxy_llava.rules import _ARM_ANSWERS  # the caption's arm labels -> GZ2 answers, one home

# The labels a probability can go to (an "unknown" answer has no probability).
PROB_LABELS = {a: tuple(x for x in LABELS[a] if x != UNKNOWN) for a in ATTRIBUTES}
ECE_BINS = 10
# Vote-fraction columns each (attribute, label) is compared with (summed when several): the share
# of the volunteers who answered the question that way. Labels without a GZ2 answer of their own
# ("spiral", a shape or arm count "none", a "no") are left out. A prominent bulge is "obvious" or
# "dominant", as the tree rules read it; the reference rules record only "obvious".
VOTE_FRACTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "type": {"elliptical": (col("smooth-or-featured", "smooth"),),
             "artifact": (col("smooth-or-featured", "artifact"),)},
    "shape": {s: (col("how-rounded", s),) for s in SHAPES},
    "bar": {"yes": (col("bar", "yes"),)},
    "arms": {label: (col("spiral-arm-count", answer),) for label, answer in _ARM_ANSWERS},
    "prominent_bulge": {"yes": (col("bulge-size", "obvious"), col("bulge-size", "dominant"))},
    "boxy_bulge": {"yes": (col("bulge-shape", "boxy"),)},
    "disturbed": {"yes": (col("something-odd", "yes"),)},
}


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


def auroc(truth: Sequence[str], probs: Sequence[dict[str, float]],
          labels: Sequence[str]) -> float | None:
    """Area under the ROC curve, one-vs-rest and macro-averaged over the labels present in the
    truth (scikit-learn's ``roc_auc_score`` per label; for two labels this is the binary AUROC).
    None when the truth has fewer than two labels, where it is undefined."""
    y, p, _ = _matrix(truth, probs, labels)
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(sum(roc_auc_score(y == k, p[:, k]) for k in present) / len(present))


def vote_error(attribute: str, probs: Sequence[dict[str, float]],
               fractions: Sequence[dict | None]) -> tuple[float | None, int]:
    """Zoobot's measure: the mean squared difference between the predicted probability of each
    label in :data:`VOTE_FRACTIONS` and its GZ2 vote fraction, over the (galaxy, label) pairs
    whose fraction the record holds (missing or null columns are skipped); (mse, pairs)."""
    total, pairs = 0.0, 0
    for p, f in zip(probs, fractions):
        for label, columns in VOTE_FRACTIONS[attribute].items():
            values = [f[c] for c in columns if f and f.get(c) is not None]
            if values:
                total += (p.get(label, 0.0) - sum(values)) ** 2
                pairs += 1
    return (total / pairs if pairs else None), pairs


def calibration(truths: Sequence[Morphology], probs: Sequence[dict[str, dict[str, float]]],
                fractions: Sequence[dict | None] | None = None) -> dict:
    """Per attribute, over the galaxies where it applies (judged by the truth, as accuracy is):
    ``n``, ``brier``, ``ece`` with its ``reliability`` bins, ``auroc`` and, with ``fractions``
    (the records' GZ2 vote fractions), ``vote_mse`` over ``vote_pairs``. ``probs``: one
    ``{attribute: {label: p}}`` per galaxy, each attribute's probabilities summing to 1."""
    if len(truths) != len(probs):
        raise ValueError(f"{len(truths)} truths but {len(probs)} probability rows")
    tl = [labels_of(t) for t in truths]
    out = {}
    for a in ATTRIBUTES:
        idx = [i for i, t in enumerate(truths) if APPLIES[a](t)]
        truth, p = [tl[i][a] for i in idx], [probs[i][a] for i in idx]
        rel = reliability(truth, p, PROB_LABELS[a])
        mse, pairs = (vote_error(a, p, [fractions[i] for i in idx]) if fractions is not None
                      else (None, 0))
        out[a] = {"n": len(idx), "brier": brier_score(truth, p, PROB_LABELS[a]),
                  "ece": rel.pop("ece"), "auroc": auroc(truth, p, PROB_LABELS[a]),
                  "vote_mse": mse, "vote_pairs": pairs,
                  "reliability": {"bins": ECE_BINS, **rel}}
    return out


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
