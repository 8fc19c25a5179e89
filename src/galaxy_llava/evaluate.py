"""Score galaxy descriptions against the catalogue truth and write EVAL folders.

Three kinds of predictor share one metric function (:func:`galaxy_llava.metrics.compute_metrics`)
and one ``metrics.json`` layout: the fine-tuned VLM (``evaluate``), a linear probe on frozen vision
features (``probe``) and a per-attribute majority class (``majority_baseline``). An EVAL folder
gets ``predictions.jsonl`` first and ``metrics.json`` last (ending in ``"complete": true``), so a
folder without ``metrics.json`` is an unfinished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json, write_jsonl
from galaxy_llava.metrics import (APPLIES, DEFAULT_LABEL, UNKNOWN, compute_metrics, format_table,
                                  judge, labels_of, majority_labels, morphology_of, read_answer)
from galaxy_llava.morphology import ATTRIBUTES, Morphology

# ------------------------------------------------------------------ EVAL folders

def load_split(data: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """Records of one split of a prepared dataset; an unknown or empty split is a UserError
    naming the splits the dataset has."""
    from galaxy_llava.records import load_records

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
    from galaxy_llava.config import DEFAULT_PROMPT
    from galaxy_llava.models.folders import read_prompt

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
    from galaxy_llava.models.loading import load_for_inference

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
    via the family's ``vision_features``), one ``(n, d)`` float32 row per image."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_image

    param = next(net.parameters())
    family = family_for(net)
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            pv = family.pixel_values(processor, [load_image(p) for p in paths[i:i + batch_size]])
            h = family.vision_features(net, pv.to(param.device, param.dtype))
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
    from galaxy_llava.models.loading import load_for_inference

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
