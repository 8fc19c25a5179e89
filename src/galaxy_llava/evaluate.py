"""Score galaxy descriptions against the catalogue truth and write EVAL folders.

Three kinds of predictor share one metric function (:func:`galaxy_llava.metrics.compute_metrics`)
and one ``metrics.json`` layout: the fine-tuned VLM (``evaluate``), a linear probe on frozen vision
features (:mod:`galaxy_llava.probe`, built on this module's EVAL folders) and a per-attribute
majority class (``majority_baseline``). Each also gives probabilities (the VLM: its posterior over
the rule set's captions, summed per attribute; the probe: ``predict_proba``; the majority:
training-set frequencies), scored by :func:`galaxy_llava.calibration.calibration`. The VLM's
grammar-argmax captions get their own metrics under ``grammar``. An EVAL folder holds
``predictions.jsonl`` and ``metrics.json`` (ending in ``"complete": true``, recording its
``inputs`` and a snapshot of the training run's settings, so a report shows what was evaluated
even after the run folder changes). It is written whole or not at all (built beside it, then
swapped in): a run that fails leaves the previous results as they were. Another evaluation's
folder needs ``overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import outputs
from galaxy_llava.config import DECODING
from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object, write_json, write_jsonl
from galaxy_llava.calibration import (calibration, format_calibration, grammar_probabilities,
                                      majority_probabilities)
from galaxy_llava.metrics import (UNKNOWN, collapse_warning, compute_metrics, format_table, judge,
                                  labels_of, majority_labels, morphology_of, read_answer)
from galaxy_llava.modelcard import owns_card, update_card
from galaxy_llava.models.folders import abs_if_local, is_local, read_prompt, run_kind
from galaxy_llava.models.preflight import check_generation
from galaxy_llava.morphology import ATTRIBUTES, Morphology
from galaxy_llava.records import SPLITS, dataset_folder, load_records, split_name
from galaxy_llava.rules import rule_set
from galaxy_llava.run_layout import run_path, training_snapshot

# ------------------------------------------------------------------ EVAL folders

def load_split(data: str | Path, split: str, limit: int | None = None,
               allow_outside: bool = False) -> list[dict]:
    """Records of one split of a prepared dataset; an unknown or empty split is a UserError
    naming the splits the dataset has. Images outside the dataset's folder need
    ``allow_outside``."""
    split = split_name(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit must be at least 1, got {limit}")
    records = load_records(data, allow_outside=allow_outside)
    present = sorted({r.get("split") for r in records} - {None},
                     key=lambda s: ([*SPLITS, s]).index(s))
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


def dataset_rules(data: str | Path) -> str | None:
    """The caption rule set a prepared dataset was made with (its ``manifest.json``), or None."""
    rules = read_json_object(dataset_folder(data) / "manifest.json").get("rules")
    return rules if isinstance(rules, str) else None


def prediction_rows(records: Sequence[dict], preds: Sequence[dict[str, str]],
                    texts: Sequence[str], parsed_ok: Sequence[bool | None],
                    probabilities: Sequence[dict] | None = None) -> list[dict]:
    """The lines of ``predictions.jsonl``: truth, answer, parsed attributes and per-attribute ok;
    with ``probabilities``, each galaxy's ``{attribute: {label: p}}`` too."""
    rows = []
    for i, (r, p, text, ok) in enumerate(zip(records, preds, texts, parsed_ok)):
        truth = truth_of(r)
        parsed = {a: None if p[a] == UNKNOWN else v for a, v in morphology_of(p).to_dict().items()}
        flags = judge(truth, p)
        rows.append({
            "id_str": r.get("id_str"), "image": r.get("image"), "truth": r.get("text"),
            "prediction": text, "truth_attributes": truth.to_dict(), "parsed": parsed,
            "ok": flags, "parsed_ok": ok,
            "exact": bool(ok is not False and all(p[a] == labels_of(truth)[a] for a in ATTRIBUTES)),
        })
        if probabilities is not None:
            rows[-1]["probabilities"] = probabilities[i]
    return rows


def write_eval(out: str | Path, rows: list[dict], metrics: dict, name: str | None = None,
               **info: Any) -> dict:
    """Write the EVAL folder whole: ``predictions.jsonl`` and ``metrics.json`` (info fields
    first, ``complete`` last), built beside ``out`` and swapped in (other files there are kept).
    Callers check ``out`` first with :func:`claim_eval`. With a ``run`` folder among ``info``
    and no ``training``, the run's training is snapshotted now (:func:`training_snapshot`;
    ``evaluate`` and ``probe`` take theirs before the weights load)."""
    out = Path(out)
    if info.get("run") and "training" not in info:
        info["training"] = training_snapshot(info["run"])
    full = {"name": name or out.name, **info, **metrics, "complete": True}
    with outputs.staged_folder(out, keep=True) as stage:
        write_jsonl(stage / "predictions.jsonl", rows)
        write_json(stage / "metrics.json", full)
    return full


def eval_inputs(kind: str, model: str | Path | None, data: str | Path, split: str,
                **settings: Any) -> dict:
    """What an evaluation is made from (stored as ``metrics.json`` ``inputs``): a re-run with
    the same inputs may replace it, other inputs need ``overwrite``. Paths are absolute (a
    model may be a Hub id), so the EVAL folder reads the same from any working directory."""
    return {"kind": kind, "model": None if model is None else abs_if_local(str(model)),
            "data": str(Path(data).expanduser().resolve()), "split": split_name(split),
            **settings}


def claim_eval(out: str | Path, inputs: dict, overwrite: bool = False) -> None:
    """Refuse (one line) an ``--out`` that is a file, holds something other than an EVAL
    folder, or another evaluation (unless ``overwrite``); before any model is loaded."""
    outputs.claim(out, "eval", overwrite=overwrite, identity=inputs)


def majority_baseline(data: str | Path, split: str = "test", out: str | Path = "eval-majority",
                      limit: int | None = None, name: str | None = None,
                      overwrite: bool = False) -> dict:
    """Predict each attribute's most common training value for every galaxy of ``split``, with
    the training-set frequencies as its probabilities; writes an EVAL folder like
    :func:`evaluate` (kind "majority")."""
    inputs = eval_inputs("majority", None, data, split, limit=limit)
    claim_eval(out, inputs, overwrite)
    records = load_split(data, split, limit)
    train = [truth_of(r) for r in load_split(data, "train")]
    labels = majority_labels(train)
    caption = morphology_of(labels).caption()
    preds = [dict(labels) for _ in records]
    probs = [majority_probabilities(train)] * len(records)
    truths = [truth_of(r) for r in records]
    metrics = compute_metrics(truths, preds)
    # its frequencies of shape, bar and arms are among that type's galaxies: given the type
    metrics["calibration"] = calibration(truths, probs, [r.get("fractions") for r in records],
                                         rules=dataset_rules(data) or "reference",
                                         given_type=True)
    rows = prediction_rows(records, preds, [caption] * len(records), [None] * len(records), probs)
    return write_eval(out, rows, metrics, name, kind="majority", model=None,
                      split=inputs["split"], run=None,
                      data=inputs["data"], rules=dataset_rules(data), majority=labels,
                      inputs=inputs)


def with_majority(metrics: dict, data: str | Path, records: Sequence[dict]) -> list[dict]:
    """``metrics`` plus, for context, the majority baseline on the same galaxies (when the
    dataset has a train split): the rows of the table ``evaluate`` and ``probe`` print, so the
    floor a predictor must beat is in sight."""
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
    return "model" if Path(model).is_dir() and read_prompt(model) else "default"


def _add_to_card(model: str | Path, metrics: dict) -> None:
    """Put this evaluation in the model card of a folder that galaxy-llava train or export
    wrote (a run's ``adapter/`` or ``model/``, an export: :func:`galaxy_llava.modelcard.owns_card`),
    what a Hub user reads (:func:`galaxy_llava.modelcard.update_card`). Hub ids and other folders
    (a base model, a tiny model) are never written; a folder we cannot write to gets a one-line
    note, not a failure."""
    if not is_local(str(model)):
        return
    folder = Path(model).expanduser()
    kind = run_kind(folder)
    weights = {"adapter": folder / "adapter", "full": folder / "model", "model": folder}.get(kind)
    if weights is None or not owns_card(weights):
        return

    try:
        card = update_card(folder, metrics)
    except (OSError, UserError) as e:
        print(f"note: the model card was not updated ({e})", file=sys.stderr)
        return
    print(f"added this evaluation to the model card {card}")


def evaluate(model: str | Path, data: str | Path, *, split: str = "test",
             out: str | Path = "eval", batch_size: int = DECODING.batch_size,
             num_beams: int = DECODING.num_beams,
             max_new_tokens: int = DECODING.max_new_tokens, limit: int | None = None,
             name: str | None = None, overwrite: bool = False,
             allow_outside_paths: bool = False, scores: bool = True,
             rules: str | None = None) -> dict:
    """Describe every galaxy of ``split`` with ``model`` (a run folder, model folder or Hub id)
    using its own prompt and beam search, score the answers and write ``out/predictions.jsonl``
    and ``out/metrics.json``; returns the metrics.

    With ``scores`` (the default) every galaxy's posterior over the captions of ``rules`` (by
    default the rule set the dataset was prepared with) is computed too: its most probable
    caption is scored under ``grammar`` and its per-attribute probabilities are calibrated
    against the truth and the vote fractions. Prints one warning line when the answers collapse
    to one or two captions. Settings, ``out``, the data and the model's files are checked before
    the model loads."""
    rules = rules or dataset_rules(data) or "reference"
    rule_set(rules)  # an unknown name is one line, before any work
    generation = {"batch_size": batch_size, "num_beams": num_beams,
                  "max_new_tokens": max_new_tokens, "limit": limit}
    inputs = eval_inputs("vlm", model, data, split, **generation, scores=bool(scores),
                         rules=rules if scores else None)
    check_generation(model, batch_size, num_beams, max_new_tokens)
    records = load_split(data, split, limit, allow_outside_paths)
    claim_eval(out, inputs, overwrite)
    from galaxy_llava.generate import describe_images
    from galaxy_llava.models.loading import load_for_inference

    run = run_path(model)
    training = training_snapshot(run) if run else None  # as the weights about to load were
    net, processor, prompt = load_for_inference(str(model))
    source = _prompt_source(model)  # load_for_inference warned when it is the default
    paths = [r["image"] for r in records]
    texts = [t or "" for t in describe_images(
        net, processor, paths, prompt, batch_size=batch_size,
        num_beams=num_beams, max_new_tokens=max_new_tokens)]
    answers = [read_answer(t) for t in texts]
    truths = [truth_of(r) for r in records]
    truth_texts = [r.get("text") or t.caption() for r, t in zip(records, truths)]
    metrics = compute_metrics(truths, [a[0] for a in answers], [a[1] for a in answers], texts,
                              truth_texts)
    metrics["collapse_warning"] = collapse_warning(texts, truth_texts)
    rows = prediction_rows(records, [a[0] for a in answers], texts, [a[1] for a in answers])
    if scores:
        metrics["grammar"] = _grammar(net, processor, prompt, rules, records, truths,
                                      truth_texts, rows, batch_size)
    full = write_eval(out, rows, metrics, name, kind="vlm", model=inputs["model"],
                      split=inputs["split"],
                      run=run, data=inputs["data"], prompt=prompt, prompt_source=source,
                      generation=generation, rules=rules if scores else dataset_rules(data),
                      training=training, inputs=inputs)
    print(format_table(with_majority(full, data, records)))
    if scores:
        print(format_calibration([full]))
    warning = metrics["collapse_warning"] or (metrics.get("grammar") or {}).get(
        "collapse_warning")
    if warning:
        print(warning, file=sys.stderr)
    _add_to_card(model, full)
    return full


def _grammar(net: Any, processor: Any, prompt: str, rules: str, records: Sequence[dict],
             truths: Sequence[Morphology], truth_texts: Sequence[str], rows: list[dict],
             batch_size: int) -> dict:
    """Score every galaxy over the grammar (:func:`galaxy_llava.scoring.grammar_scores`, the
    prompt and image run once per galaxy); add each row's ``grammar`` (best caption, entropy,
    exact, per-attribute ok) and ``probabilities``; return the grammar-argmax metrics with their
    ``calibration`` and ``collapse_warning``."""
    from tqdm.auto import tqdm

    from galaxy_llava.scoring import grammar_scores

    found = []
    paths = [r["image"] for r in records]
    for i in tqdm(range(0, len(paths), batch_size), desc="grammar scores", unit="batch"):
        found += grammar_scores(net, processor, paths[i:i + batch_size], rules, prompt)
    best = [f.best for f in found]
    labels = [read_answer(b)[0] for b in best]
    probs = [grammar_probabilities(f.marginals) for f in found]
    metrics = compute_metrics(truths, labels, [True] * len(best), best, truth_texts)
    for row, f, lab, p, t in zip(rows, found, labels, probs, truths):
        row["grammar"] = {"best": f.best, "entropy": f.entropy, "ok": judge(t, lab),
                          "exact": all(lab[a] == labels_of(t)[a] for a in ATTRIBUTES)}
        row["probabilities"] = p
    return {"rules": rules, **metrics,
            "calibration": calibration(truths, probs, [r.get("fractions") for r in records],
                                       rules=rules),
            "collapse_warning": collapse_warning(best, truth_texts,
                                                 "most probable captions (grammar)")}
