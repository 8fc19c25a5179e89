"""Score galaxy descriptions against the catalogue truth and write EVAL folders.

Three kinds of predictor share one metric function (:func:`galaxy_llava.metrics.compute_metrics`)
and one ``metrics.json`` layout: the fine-tuned VLM (``evaluate``), a linear probe on frozen vision
features (``probe``) and a per-attribute majority class (``majority_baseline``). An EVAL folder
holds ``predictions.jsonl`` and ``metrics.json`` (ending in ``"complete": true``, and recording
its ``inputs``). It is written whole or not at all (built beside it, then swapped in): a run that
fails leaves the previous results as they were. Another evaluation's folder needs ``overwrite``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import outputs
from galaxy_llava.errors import UserError
from galaxy_llava.io import write_json, write_jsonl
from galaxy_llava.metrics import (APPLIES, DEFAULT_LABEL, UNKNOWN, compute_metrics, format_table,
                                  judge, labels_of, majority_labels, morphology_of, read_answer)
from galaxy_llava.morphology import ATTRIBUTES, Morphology

# ------------------------------------------------------------------ EVAL folders

def load_split(data: str | Path, split: str, limit: int | None = None,
               allow_outside: bool = False) -> list[dict]:
    """Records of one split of a prepared dataset; an unknown or empty split is a UserError
    naming the splits the dataset has. Images outside the dataset's folder need
    ``allow_outside``."""
    from galaxy_llava.records import load_records

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit must be at least 1, got {limit}")
    records = load_records(data, allow_outside=allow_outside)
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
    """Write the EVAL folder whole: ``predictions.jsonl`` and ``metrics.json`` (info fields
    first, ``complete`` last), built beside ``out`` and swapped in (other files there are kept).
    Callers check ``out`` first with :func:`claim_eval`."""
    out = Path(out)
    full = {"name": name or out.name, **info, **metrics, "complete": True}
    with outputs.staged_folder(out, keep=True) as stage:
        write_jsonl(stage / "predictions.jsonl", rows)
        write_json(stage / "metrics.json", full)
    return full


def eval_inputs(kind: str, model: str | Path | None, data: str | Path, split: str,
                **settings: Any) -> dict:
    """What an evaluation is made from (stored as ``metrics.json`` ``inputs``): a re-run with
    the same inputs may replace it, other inputs need ``overwrite``."""
    from galaxy_llava.models.folders import abs_if_local

    return {"kind": kind, "model": None if model is None else abs_if_local(str(model)),
            "data": str(Path(data).expanduser().resolve()), "split": split, **settings}


def claim_eval(out: str | Path, inputs: dict, overwrite: bool = False) -> None:
    """Refuse (one line) an ``--out`` that is a file, holds something other than an EVAL
    folder, or another evaluation (unless ``overwrite``); before any model is loaded."""
    outputs.claim(out, "eval", overwrite=overwrite, identity=inputs)


def majority_baseline(data: str | Path, split: str = "test", out: str | Path = "eval-majority",
                      limit: int | None = None, name: str | None = None,
                      overwrite: bool = False) -> dict:
    """Predict each attribute's most common training value for every galaxy of ``split``;
    writes an EVAL folder like :func:`evaluate` (kind "majority")."""
    inputs = eval_inputs("majority", None, data, split, limit=limit)
    claim_eval(out, inputs, overwrite)
    records = load_split(data, split, limit)
    train = load_split(data, "train")
    labels = majority_labels(truth_of(r) for r in train)
    caption = morphology_of(labels).caption()
    preds = [dict(labels) for _ in records]
    metrics = compute_metrics([truth_of(r) for r in records], preds)
    rows = prediction_rows(records, preds, [caption] * len(records), [None] * len(records))
    return write_eval(out, rows, metrics, name, kind="majority", model=None, split=split, run=None,
                      data=str(data), majority=labels, inputs=inputs)


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

def _prompt_source(model: str | Path) -> str:
    """"model" when the prompt came stored with the model, else "default" (the family's)."""
    from galaxy_llava.models.folders import read_prompt

    return "model" if Path(model).is_dir() and read_prompt(model) else "default"


def evaluate(model: str | Path, data: str | Path, split: str = "test",
             out: str | Path = "eval", batch_size: int = 16, num_beams: int = 3,
             max_new_tokens: int = 40, limit: int | None = None,
             name: str | None = None, overwrite: bool = False,
             allow_outside_paths: bool = False) -> dict:
    """Describe every galaxy of ``split`` with ``model`` (a run folder, model folder or Hub id)
    using its own prompt, score the answers and write ``out/predictions.jsonl`` and
    ``out/metrics.json``; returns the metrics.

    Settings, ``out``, the data and the model's files are checked before the model loads."""
    from galaxy_llava.checks import check_generation

    generation = {"batch_size": batch_size, "num_beams": num_beams,
                  "max_new_tokens": max_new_tokens, "limit": limit}
    inputs = eval_inputs("vlm", model, data, split, **generation)
    check_generation(model, batch_size, num_beams, max_new_tokens)
    records = load_split(data, split, limit, allow_outside_paths)
    claim_eval(out, inputs, overwrite)
    from galaxy_llava.generate import describe_images
    from galaxy_llava.models.loading import load_for_inference

    net, processor, prompt = load_for_inference(str(model))
    source = _prompt_source(model)  # load_for_inference warned when it is the default
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
                      prompt_source=source, generation=generation, inputs=inputs)
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
            per_image = [family.image_inputs(processor, load_image(p))
                         for p in paths[i:i + batch_size]]
            batch = {k: torch.cat([p[k] for p in per_image]).to(param.device)
                     for k in per_image[0]}
            batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
            rows = family.split_features(family.vision_features(net, batch), batch)
            # One pooled vector per image: the mean over all its feature tokens.
            feats += [r.float().reshape(-1, r.shape[-1]).mean(dim=0).cpu().numpy() for r in rows]
    return np.stack(feats).astype("float32")


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
          name: str | None = None, overwrite: bool = False,
          allow_outside_paths: bool = False) -> dict:
    """Linear-probe baseline: one logistic regression per attribute on pooled frozen vision
    features, fitted on ``train`` where the attribute applies, scored on ``split``. The type
    prediction decides which of shape / bar / arms is stated. Writes an EVAL folder."""
    from galaxy_llava.checks import number, preflight_model

    number("--batch-size", batch_size, 1, integer=True)
    inputs = eval_inputs("probe", model, data, split, limit=limit)
    preflight_model(model)
    records = load_split(data, split, limit, allow_outside_paths)
    train = load_split(data, "train", allow_outside=allow_outside_paths)
    claim_eval(out, inputs, overwrite)
    from galaxy_llava.models.loading import load_for_inference

    net, processor, _ = load_for_inference(str(model))
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
                      probe={"train_n": len(train), "feature_dim": int(x_train.shape[1])},
                      inputs=inputs)
    print(format_table(_with_majority(full, data, records)))
    return full


def evaluate_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava evaluate``."""
    m = evaluate(args.model, args.data, split=args.split, out=args.out,
                 batch_size=args.batch_size, num_beams=args.num_beams,
                 max_new_tokens=args.max_new_tokens, limit=args.limit,
                 overwrite=args.overwrite, allow_outside_paths=args.allow_outside_paths)
    print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'metrics.json'}")
    return m


def probe_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava probe``."""
    m = probe(args.model, args.data, split=args.split, out=args.out, overwrite=args.overwrite,
              allow_outside_paths=args.allow_outside_paths)
    print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'metrics.json'}")
    return m
