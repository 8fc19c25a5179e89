"""Score galaxy descriptions against the catalogue truth, attribute by attribute.

Every answer is parsed back into attributes with :func:`galaxy_llava.morphology.parse_caption`
and compared per attribute, only on the galaxies where the attribute applies (see ``APPLIES``).
Empty or ungrammatical answers are counted (as wrong or unparsed), never a crash. Three kinds of
predictor share one metric function and one ``metrics.json`` layout: the fine-tuned VLM
(``evaluate``), a linear probe on frozen vision features (``probe``) and a per-attribute majority
class (``majority_baseline``). An EVAL folder gets ``predictions.jsonl`` first and ``metrics.json``
last (ending in ``"complete": true``), so a folder without ``metrics.json`` is an unfinished run.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json, write_jsonl
from galaxy_llava.morphology import (ARMS, ATTRIBUTES, SHAPES, TYPE_PHRASES, TYPES, Morphology,
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
_TYPE_CLAUSES = {re.sub(r"\s+", " ", p.lower()) for p in TYPE_PHRASES.values()}


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
    labels = labels_of(m)
    first = re.sub(r"\s+", " ", text.strip().lower()).split(".", 1)[0].split(",", 1)[0].strip()
    if first not in _TYPE_CLAUSES:
        labels = {a: UNKNOWN for a in ATTRIBUTES}
    return labels, bool(text.strip()) and m.parsed_ok, m


def judge(truth: Morphology, pred: dict[str, str]) -> dict[str, bool | None]:
    """Per-attribute right/wrong of one prediction; None where the attribute does not apply."""
    t = labels_of(truth)
    return {a: (pred[a] == t[a]) if APPLIES[a](truth) else None for a in ATTRIBUTES}


# ------------------------------------------------------------------ metrics

def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def attribute_metrics(truth: Sequence[str], pred: Sequence[str], order: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (over labels seen in truth or prediction) and confusion matrix
    (rows truth, columns prediction) of one attribute; null metrics when ``n`` is 0."""
    seen = set(truth) | set(pred)
    labels = [x for x in order if x in seen] + sorted(seen - set(order))
    index = {x: i for i, x in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, pred):
        matrix[index[t]][index[p]] += 1
    n = len(truth)
    f1s = []
    for i in range(len(labels)):
        tp = matrix[i][i]
        fp = sum(row[i] for row in matrix) - tp
        fn = sum(matrix[i]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "n": n,
        "accuracy": _ratio(sum(matrix[i][i] for i in range(len(labels))), n),
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
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


def format_table(metrics_list: Sequence[dict]) -> str:
    """A plain-text comparison table, one row per run; rates in percent, "-" where null."""
    head = ["run", "n"] + [c for c, _ in TABLE_COLUMNS]
    rows = [head]
    for m in metrics_list:
        row = [str(m.get("name") or m.get("kind") or "?"), str(m.get("n", ""))]
        for _, key in TABLE_COLUMNS:
            v = table_value(m, key)
            row.append("-" if v is None else f"{v:.1f}" if key == "mean_length"
                       else f"{100 * v:.1f}%")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ EVAL folders

def load_split(data: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """Records of one split of a prepared dataset; an unknown or empty split is a UserError
    naming the splits the dataset has."""
    from galaxy_llava.data import load_records

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    records = load_records(data)
    present = sorted({r.get("split") for r in records} - {None},
                     key=lambda s: (["train", "val", "test"] + [s]).index(s))
    chosen = [r for r in records if r.get("split") == split]
    if not chosen:
        raise UserError(f"split {split!r} has no galaxies in {data}; "
                        f"its splits are: {', '.join(present) or 'none'}")
    return chosen[:limit] if limit else chosen


def truth_of(record: dict) -> Morphology:
    """The truth Morphology of a prepared record."""
    try:
        return Morphology.from_dict(record["morphology"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"record {record.get('id_str')!r} has no valid 'morphology': {e}") from e


def run_folder(model: str | Path) -> str | None:
    """The absolute path of ``model`` when it is a training run folder, else None."""
    p = Path(model)
    markers = ("train_metrics.json", "loss_log.jsonl", "adapter", "model")
    if p.is_dir() and any((p / m).exists() for m in markers):
        return str(p.resolve())
    return None


def prediction_rows(records: Sequence[dict], preds: Sequence[dict[str, str]],
                    texts: Sequence[str], parsed_ok: Sequence[bool | None]) -> list[dict]:
    """The lines of ``predictions.jsonl``: truth, answer, parsed attributes and per-attribute ok."""
    rows = []
    for r, p, text, ok in zip(records, preds, texts, parsed_ok):
        truth = truth_of(r)
        parsed = {a: None if p[a] == UNKNOWN else v for a, v in morphology_of(p).to_dict().items()}
        flags = judge(truth, p)
        rows.append({
            "id_str": r.get("id_str"), "image": r.get("image"), "truth": r.get("text"),
            "prediction": text, "truth_attributes": truth.to_dict(), "parsed": parsed,
            "ok": flags, "parsed_ok": ok,
            "exact": bool(ok is not False and all(p[a] == labels_of(truth)[a] for a in ATTRIBUTES)),
        })
    return rows


def write_eval(out: str | Path, rows: list[dict], metrics: dict, name: str | None = None,
               **info: Any) -> dict:
    """Write ``predictions.jsonl`` then ``metrics.json`` (info fields first, ``complete`` last)."""
    out = Path(out)
    write_jsonl(out / "predictions.jsonl", rows)
    full = {"name": name or out.name, **info, **metrics, "complete": True}
    write_json(out / "metrics.json", full)
    return full


def start_eval(out: str | Path) -> Path:
    """Create the EVAL folder and drop a stale ``metrics.json`` so an interrupted rerun is
    recognisably unfinished."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    return out


def majority_baseline(data: str | Path, split: str = "test", out: str | Path = "eval-majority",
                      limit: int | None = None, name: str | None = None) -> dict:
    """Predict each attribute's most common training value for every galaxy of ``split``;
    writes an EVAL folder like :func:`evaluate` (kind "majority")."""
    records = load_split(data, split, limit)
    train = load_split(data, "train")
    out = start_eval(out)
    labels = majority_labels(truth_of(r) for r in train)
    caption = morphology_of(labels).caption()
    preds = [dict(labels) for _ in records]
    metrics = compute_metrics([truth_of(r) for r in records], preds)
    rows = prediction_rows(records, preds, [caption] * len(records), [None] * len(records))
    return write_eval(out, rows, metrics, name, kind="majority", model=None, split=split, run=None,
                      data=str(data), majority=labels)


def _with_majority(metrics: dict, data: str | Path, records: Sequence[dict]) -> list[dict]:
    """``metrics`` plus, for context, the majority baseline on the same galaxies (when the
    dataset has a train split)."""
    try:
        train = load_split(data, "train")
    except UserError:
        return [metrics]
    labels = majority_labels(truth_of(r) for r in train)
    base = compute_metrics([truth_of(r) for r in records], [dict(labels) for _ in records])
    return [metrics, {"name": "majority (train)", **base}]


# ------------------------------------------------------------------ VLM evaluation

def _resolve_prompt(model: str | Path, prompt: str | None) -> tuple[str, str]:
    """(prompt, source): the prompt stored with the model ("model"), else the default ("default")."""
    from galaxy_llava.modeling import DEFAULT_PROMPT, read_prompt

    stored = read_prompt(model) if Path(model).is_dir() else None
    if stored:
        return stored, "model"
    return prompt or DEFAULT_PROMPT, "default"


def evaluate(model: str | Path, data: str | Path, split: str = "test",
             out: str | Path = "eval", batch_size: int = 16, num_beams: int = 3,
             max_new_tokens: int = 40, limit: int | None = None,
             name: str | None = None) -> dict:
    """Describe every galaxy of ``split`` with ``model`` (a run folder, model folder or Hub id)
    using its own prompt, score the answers and write ``out/predictions.jsonl`` and
    ``out/metrics.json``; returns the metrics."""
    from galaxy_llava.generate import describe_images
    from galaxy_llava.modeling import load_for_inference

    records = load_split(data, split, limit)
    net, processor, prompt = load_for_inference(str(model))
    out = start_eval(out)
    prompt, source = _resolve_prompt(model, prompt)
    if source == "default":
        print(f"note: {model} stores no prompt; using the default prompt {prompt!r}")
    texts = [t or "" for t in describe_images(
        net, processor, [r["image"] for r in records], prompt, batch_size=batch_size,
        num_beams=num_beams, max_new_tokens=max_new_tokens)]
    answers = [read_answer(t) for t in texts]
    truths = [truth_of(r) for r in records]
    metrics = compute_metrics(truths, [a[0] for a in answers], [a[1] for a in answers], texts,
                              [r.get("text") or t.caption() for r, t in zip(records, truths)])
    rows = prediction_rows(records, [a[0] for a in answers], texts, [a[1] for a in answers])
    full = write_eval(out, rows, metrics, name, kind="vlm", model=str(model), split=split,
                      run=run_folder(model), data=str(data), prompt=prompt,
                      prompt_source=source,
                      generation={"batch_size": batch_size, "num_beams": num_beams,
                                  "max_new_tokens": max_new_tokens, "limit": limit})
    print(format_table(_with_majority(full, data, records)))
    return full


# ------------------------------------------------------------------ linear probe

def pooled_features(net: Any, processor: Any, paths: Sequence[str], batch_size: int = 16,
                    desc: str = "features"):
    """Mean over image tokens of the frozen vision tower's selected layer (the projector's input,
    via :func:`galaxy_llava.features.vision_features`), one ``(n, d)`` float32 row per image."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from galaxy_llava.data import load_image, pixel_values
    from galaxy_llava.features import vision_features

    param = next(net.parameters())
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            pv = pixel_values(processor, [load_image(p) for p in paths[i:i + batch_size]])
            h = vision_features(net, pv.to(param.device, param.dtype))
            feats.append(h.float().mean(dim=1).cpu().numpy())
    return np.concatenate(feats).astype("float32")


def _fit_predict(x_train, y_train: list[str], x_test, fallback: str) -> list[str]:
    """Logistic regression on standardised features; a constant (or empty) label set is
    predicted as that constant (or ``fallback``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(y_train))
    if len(classes) < 2:
        return [classes[0] if classes else fallback] * len(x_test)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train, y_train)
    return [str(v) for v in clf.predict(x_test)]


def probe(model: str | Path, data: str | Path, split: str = "test",
          out: str | Path = "eval-probe", batch_size: int = 16, limit: int | None = None,
          name: str | None = None) -> dict:
    """Linear-probe baseline: one logistic regression per attribute on pooled frozen vision
    features, fitted on ``train`` where the attribute applies, scored on ``split``. The type
    prediction decides which of shape / bar / arms is stated. Writes an EVAL folder."""
    from galaxy_llava.modeling import load_for_inference

    records = load_split(data, split, limit)
    train = load_split(data, "train")
    net, processor, _ = load_for_inference(str(model))
    out = start_eval(out)
    x_train = pooled_features(net, processor, [r["image"] for r in train], batch_size,
                              "features train")
    x_test = pooled_features(net, processor, [r["image"] for r in records], batch_size,
                             f"features {split}")
    train_truths = [truth_of(r) for r in train]
    columns: dict[str, list[str]] = {}
    for a in ATTRIBUTES:
        idx = [i for i, t in enumerate(train_truths) if APPLIES[a](t)]
        fallback = "spiral" if a == "type" else DEFAULT_LABEL[a]
        columns[a] = _fit_predict(x_train[idx], [labels_of(train_truths[i])[a] for i in idx],
                                  x_test, fallback)
    preds = []
    for i in range(len(records)):
        p = {a: columns[a][i] for a in ATTRIBUTES}
        if p["type"] != "elliptical":
            p["shape"] = "none"
        if p["type"] != "spiral":
            p["bar"], p["arms"] = "no", "none"
        preds.append(p)
    truths = [truth_of(r) for r in records]
    metrics = compute_metrics(truths, preds)
    rows = prediction_rows(records, preds, [morphology_of(p).caption() for p in preds],
                           [None] * len(records))
    full = write_eval(out, rows, metrics, name, kind="probe", model=str(model), split=split,
                      run=run_folder(model), data=str(data),
                      probe={"train_n": len(train), "feature_dim": int(x_train.shape[1])})
    print(format_table(_with_majority(full, data, records)))
    return full


def evaluate_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava evaluate``."""
    m = evaluate(args.model, args.data, split=args.split, out=args.out,
                 batch_size=args.batch_size, num_beams=args.num_beams,
                 max_new_tokens=args.max_new_tokens, limit=args.limit)
    print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'metrics.json'}")
    return m


def probe_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava probe``."""
    m = probe(args.model, args.data, split=args.split, out=args.out)
    print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'metrics.json'}")
    return m
