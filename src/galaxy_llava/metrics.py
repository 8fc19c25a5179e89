"""Per-attribute metrics of galaxy descriptions against the catalogue truth: pure functions.

Every answer is parsed back into attributes with :func:`galaxy_llava.morphology.parse_caption`
and compared per attribute, only on the galaxies where the attribute applies (see ``APPLIES``).
Empty or ungrammatical answers are counted (as wrong or unparsed), never a crash. The fine-tuned
VLM, the linear probe and the majority baseline (:mod:`galaxy_llava.evaluate`) share
:func:`compute_metrics` and so one ``metrics.json`` layout; :func:`format_table` compares them.
Every accuracy carries a Wilson 95% interval. The probabilities of the predictors that give
them are scored in :mod:`galaxy_llava.calibration`, which builds on this module's labels.
:func:`collapse_warning` spots a model that gives (nearly) the same answer to every galaxy.
No torch here: scipy and scikit-learn only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from galaxy_llava.morphology import (ARMS, ATTRIBUTES, SHAPES, TYPES, Morphology, has_type_clause,
                                     parse_caption)

# Where each attribute is scored, judged by the truth. The caption grammar only says shape for
# ellipticals and bar/arms for spirals. Under the reference rules the bulge and "disturbed"
# questions are applied to every galaxy (a boxy bulge can be stated for an elliptical too), so
# they are scored on all galaxies; under the tree rules a wrongly stated boxy bulge on a face-on
# disk is then still caught as an error.
APPLIES: dict[str, Callable[[Morphology], bool]] = {
    "type": lambda t: True,
    "shape": lambda t: t.type == "elliptical",
    "bar": lambda t: t.type == "spiral",
    "arms": lambda t: t.type == "spiral",
    "prominent_bulge": lambda t: True,
    "boxy_bulge": lambda t: True,
    "disturbed": lambda t: True,
}
# Label of every attribute of an answer that is not a caption at all (no type clause): such an
# answer is wrong on every attribute instead of earning credit for the "not said" defaults.
UNKNOWN = "unknown"
_YES_NO = ("no", "yes")
# Label order of each attribute's confusion matrix; the first non-type label is the "not said" one.
LABELS: dict[str, tuple[str, ...]] = {
    "type": TYPES + (UNKNOWN,), "shape": ("none",) + SHAPES + (UNKNOWN,),
    "bar": _YES_NO + (UNKNOWN,), "arms": ("none",) + ARMS + (UNKNOWN,),
    "prominent_bulge": _YES_NO + (UNKNOWN,), "boxy_bulge": _YES_NO + (UNKNOWN,),
    "disturbed": _YES_NO + (UNKNOWN,),
}
DEFAULT_LABEL = {a: LABELS[a][0] for a in ATTRIBUTES if a != "type"}


# ------------------------------------------------------------------ labels

def labels_of(m: Morphology) -> dict[str, str]:
    """The attributes of a Morphology as string labels (None -> "none", bools -> "yes"/"no")."""
    out = {}
    for a in ATTRIBUTES:
        v = getattr(m, a)
        out[a] = "none" if v is None else ("yes" if v else "no") if isinstance(v, bool) else str(v)
    return out


def morphology_of(labels: dict[str, str]) -> Morphology:
    """Inverse of :func:`labels_of` (an unknown type becomes the grammar default, spiral)."""
    kw: dict[str, Any] = {}
    for a, v in labels.items():
        if a == "type":
            kw[a] = v if v in TYPES else "spiral"
        elif LABELS[a][:2] == _YES_NO:
            kw[a] = v == "yes"
        else:
            kw[a] = None if v in ("none", UNKNOWN) else v
    return Morphology(**kw)


def read_answer(text: str | None) -> tuple[dict[str, str], bool, Morphology]:
    """Parse one generated answer: (labels, parsed_ok, parsed Morphology).

    An answer without a type clause is not a caption: every attribute gets ``"unknown"`` (always
    wrong) rather than the grammar's defaults, so an empty or off-topic answer earns no credit.
    A caption with some ungrammatical phrases keeps the credit of the phrases it got right."""
    text = text or ""
    m = parse_caption(text)
    labels = labels_of(m) if has_type_clause(text) else {a: UNKNOWN for a in ATTRIBUTES}
    return labels, bool(text.strip()) and m.parsed_ok, m


def judge(truth: Morphology, pred: dict[str, str]) -> dict[str, bool | None]:
    """Per-attribute right/wrong of one prediction; None where the attribute does not apply."""
    t = labels_of(truth)
    return {a: (pred[a] == t[a]) if APPLIES[a](truth) else None for a in ATTRIBUTES}


# ------------------------------------------------------------------ metrics

def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval ``[low, high]`` of the proportion ``k / n`` (scipy's ``binomtest``),
    None when ``n`` is 0. Wilson rather than the normal approximation because it stays inside
    [0, 1] and does not shrink to a point at 0 or ``n`` right, which small splits often are."""
    if not n:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def attribute_metrics(truth: Sequence[str], pred: Sequence[str], order: Sequence[str]) -> dict:
    """Accuracy with its Wilson 95% interval, macro-F1 (scikit-learn's, over the labels seen in
    truth or prediction) and confusion matrix (rows truth, columns prediction) of one
    attribute; null metrics when ``n`` is 0."""
    seen = set(truth) | set(pred)
    labels = [x for x in order if x in seen] + sorted(seen - set(order))
    index = {x: i for i, x in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, pred):
        matrix[index[t]][index[p]] += 1
    n = len(truth)
    right = sum(matrix[i][i] for i in range(len(labels)))
    macro_f1 = None
    if n:
        from sklearn.metrics import f1_score

        macro_f1 = float(f1_score(list(truth), list(pred), labels=labels, average="macro",
                                  zero_division=0))
    return {
        "n": n,
        "accuracy": _ratio(right, n),
        "accuracy_ci": wilson_interval(right, n),
        "macro_f1": macro_f1,
        "confusion": {"labels": labels, "matrix": matrix},
    }


def compute_metrics(truths: Sequence[Morphology], preds: Sequence[dict[str, str]],
                    parsed_ok: Sequence[bool] | None = None,
                    pred_texts: Sequence[str] | None = None,
                    truth_texts: Sequence[str] | None = None) -> dict:
    """All metrics of predicted labels against truth Morphologies.

    ``parsed_ok`` / ``pred_texts`` are None for caption-free predictors, whose ``parse_rate`` and
    ``mean_length`` are then null. Hallucination: share of asserted non-default values (a shape,
    a bar, an arm count, a bulge, disturbed) the truth lacks; omission: share of true non-default
    values the prediction misses. Exact match: all seven attributes right and the answer parsed."""
    if len(truths) != len(preds):
        raise ValueError(f"{len(truths)} truths but {len(preds)} predictions")
    n = len(truths)
    tl = [labels_of(t) for t in truths]
    attributes = {}
    for a in ATTRIBUTES:
        idx = [i for i, t in enumerate(truths) if APPLIES[a](t)]
        attributes[a] = attribute_metrics([tl[i][a] for i in idx], [preds[i][a] for i in idx],
                                          LABELS[a])
    asserted = hallucinated = true_set = omitted = exact = 0
    for i in range(n):
        for a, default in DEFAULT_LABEL.items():
            p, t = preds[i][a], tl[i][a]
            if p not in (default, UNKNOWN):
                asserted += 1
                hallucinated += p != t
            if t != default:
                true_set += 1
                omitted += p != t
        ok = parsed_ok[i] if parsed_ok is not None else True
        exact += ok and all(preds[i][a] == tl[i][a] for a in ATTRIBUTES)
    words = lambda texts: _ratio(sum(len(s.split()) for s in texts), len(texts))  # noqa: E731
    return {
        "n": n,
        "exact_match": _ratio(exact, n),
        "exact_match_ci": wilson_interval(exact, n),
        "parse_rate": _ratio(sum(map(bool, parsed_ok)), n) if parsed_ok is not None else None,
        "hallucination_rate": _ratio(hallucinated, asserted),
        "omission_rate": _ratio(omitted, true_set),
        "mean_length": words(pred_texts) if pred_texts is not None else None,
        "truth_mean_length": words(truth_texts if truth_texts is not None
                                   else [t.caption() for t in truths]),
        "counts": {"asserted": asserted, "hallucinated": hallucinated,
                   "true_attributes": true_set, "omitted": omitted, "exact": int(exact)},
        "attributes": attributes,
    }


def score_captions(truths: Sequence[Morphology], captions: Sequence[str | None],
                   truth_texts: Sequence[str] | None = None) -> dict:
    """Metrics of generated captions (parsed with the caption grammar) against the truth."""
    answers = [read_answer(c) for c in captions]
    return compute_metrics(truths, [a[0] for a in answers], [a[1] for a in answers],
                           [c or "" for c in captions], truth_texts)


def score_morphologies(truths: Sequence[Morphology], preds: Sequence[Morphology]) -> dict:
    """Caption-free metrics of predicted Morphologies (parse rate and mean length null)."""
    return compute_metrics(truths, [labels_of(p) for p in preds])


def majority_labels(train_truths: Iterable[Morphology]) -> dict[str, str]:
    """Most common training label of each attribute among the galaxies where it applies
    (ties broken by label order), so its accuracy is the per-attribute majority-class rate."""
    train_truths = list(train_truths)
    out = {}
    for a in ATTRIBUTES:
        counts = Counter(labels_of(t)[a] for t in train_truths if APPLIES[a](t))
        out[a] = max(LABELS[a], key=lambda x: (counts[x], -LABELS[a].index(x))) if counts \
            else LABELS[a][0] if a != "type" else "spiral"
    return out


def collapse_warning(predictions: Sequence[str | None], truths: Sequence[str | Morphology],
                     what: str = "answers") -> str | None:
    """One line when the answers collapse to one or two distinct captions while the truth has
    more than two (a model that answers without looking, whatever its loss says), else None.
    Answers are compared as written (stripped); truths may be captions or Morphologies;
    ``what`` names the answers in the line."""
    answers = [(p or "").strip() for p in predictions]
    truth = {t.caption() if isinstance(t, Morphology) else (t or "").strip() for t in truths}
    distinct = Counter(answers)
    if not answers or len(distinct) > 2 or len(truth) <= 2:
        return None
    top, count = distinct.most_common(1)[0]
    shown = top if len(top) <= 70 else top[:67] + "..."
    return (f"warning: the {len(answers)} {what} collapse to {len(distinct)} distinct "
            f"caption{'s' if len(distinct) > 1 else ''} while the truth has {len(truth)} "
            f"(most common, {count}x: {shown!r}): the model is not telling the galaxies apart")


# ------------------------------------------------------------------ table

TABLE_COLUMNS = (("type", "type"), ("shape", "shape"), ("bar", "bar"), ("arms", "arms"),
                 ("exact", "exact_match"), ("parse", "parse_rate"),
                 ("halluc", "hallucination_rate"), ("omission", "omission_rate"),
                 ("mean len", "mean_length"))


def table_value(metrics: dict, key: str) -> float | None:
    """One column of the comparison table: an attribute's accuracy or a top-level metric."""
    if key in ATTRIBUTES:
        return ((metrics.get("attributes") or {}).get(key) or {}).get("accuracy")
    return metrics.get(key)


TABLE_LEGEND = ("type..arms: accuracy where the attribute applies; exact: all 7 right; parse: "
                "answers inside the caption grammar; halluc: stated attributes the truth lacks; "
                "omission: true attributes left out; (grammar): the most probable caption; "
                "(votes): the probe's vote-fraction regressions")


def predictors(metrics_list: Sequence[dict]) -> list[tuple[str, dict]]:
    """(name, metrics) of every predictor in these ``metrics.json`` dicts: each evaluation, and
    after a VLM evaluation with grammar scores its ``grammar`` sub-dict as "NAME (grammar)",
    after a probe with vote-fraction regressions its ``votes`` sub-dict as "NAME (votes)"."""
    out = []
    for m in metrics_list:
        name = str(m.get("name") or m.get("kind") or "?")
        out.append((name, m))
        for key in ("grammar", "votes"):
            if isinstance(m.get(key), dict):
                out.append((f"{name} ({key})", m[key]))
    return out


def format_table(metrics_list: Sequence[dict]) -> str:
    """A plain-text comparison table, one row per predictor (:func:`predictors`); rates in
    percent, "-" where null; a legend line under it says what the columns mean."""
    head = ["run", "n"] + [c for c, _ in TABLE_COLUMNS]
    rows = [head]
    for name, m in predictors(metrics_list):
        row = [name, str(m.get("n", ""))]
        for _, key in TABLE_COLUMNS:
            v = table_value(m, key)
            row.append("-" if v is None else f"{v:.1f}" if key == "mean_length"
                       else f"{100 * v:.1f}%")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [TABLE_LEGEND])
