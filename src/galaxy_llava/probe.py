"""The linear-probe baseline: logistic regressions on pooled frozen vision features.

What a fine-tuned VLM should beat: one scikit-learn logistic regression per attribute on the
mean of the frozen vision tower's output (the projector's input), fitted on the ``train`` split
where the attribute applies and scored on another split like the VLM (an EVAL folder of kind
"probe", :mod:`galaxy_llava.evaluate`). Its probabilities are read as the grammar's marginals read
(:func:`probe_probabilities`), so they are calibrated on the same terms as the VLM's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from galaxy_llava.calibration import STATED_FOR, calibration, format_calibration
from galaxy_llava.evaluate import (claim_eval, dataset_rules, eval_inputs, load_split,
                                   prediction_rows, run_folder, training_snapshot, truth_of,
                                   with_majority, write_eval)
from galaxy_llava.metrics import (APPLIES, DEFAULT_LABEL, compute_metrics, format_table,
                                  labels_of, morphology_of)
from galaxy_llava.morphology import ATTRIBUTES


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


def _fit_predict(x_train, y_train: list[str], x_test,
                 fallback: str) -> tuple[list[str], list[dict[str, float]]]:
    """Logistic regression on standardised features: each test row's label and its
    ``predict_proba`` as ``{label: p}``. A constant (or empty) label set is predicted as that
    constant (or ``fallback``) with probability 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(y_train))
    if len(classes) < 2:
        label = classes[0] if classes else fallback
        return [label] * len(x_test), [{label: 1.0} for _ in range(len(x_test))]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train, y_train)
    names = [str(c) for c in clf.classes_]
    # float32 features give float32 probabilities, off 1 by ~1e-7: renormalise in float64
    proba = clf.predict_proba(x_test).astype("float64")
    proba /= proba.sum(axis=1, keepdims=True)
    probs = [dict(zip(names, map(float, row))) for row in proba]
    return [str(v) for v in clf.predict(x_test)], probs


def probe_probabilities(conditional: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """One galaxy's probe probabilities as the grammar's marginals read: shape, bar and arms
    are stated only for their type, so p(value) = p(type) * p(value | type) and the rest of the
    mass goes to "not said" ("none" / "no"). The other attributes are kept as they are."""
    out = dict(conditional)
    # The probe's classifier of a type-dependent attribute is fitted on that type's galaxies
    # only, so its probabilities are conditional on the type.
    for a, kind in STATED_FOR.items():
        p_type = conditional["type"].get(kind, 0.0)
        default = DEFAULT_LABEL[a]
        out[a] = {v: p_type * p for v, p in conditional[a].items()}
        out[a][default] = out[a].get(default, 0.0) + 1.0 - p_type
    return out


def probe(model: str | Path, data: str | Path, split: str = "test",
          out: str | Path = "eval-probe", batch_size: int = 16, limit: int | None = None,
          name: str | None = None, overwrite: bool = False,
          allow_outside_paths: bool = False) -> dict:
    """Linear-probe baseline: one logistic regression per attribute on pooled frozen vision
    features, fitted on ``train`` where the attribute applies, scored on ``split``. The type
    prediction decides which of shape / bar / arms is stated; the probabilities
    (:func:`probe_probabilities`) are calibrated like the VLM's. Writes an EVAL folder."""
    from galaxy_llava.checks import number, preflight_model

    number("--batch-size", batch_size, 1, integer=True)
    inputs = eval_inputs("probe", model, data, split, limit=limit)
    preflight_model(model)
    records = load_split(data, split, limit, allow_outside_paths)
    train = load_split(data, "train", allow_outside=allow_outside_paths)
    claim_eval(out, inputs, overwrite)
    from galaxy_llava.models.loading import load_for_inference

    run = run_folder(model)
    training = training_snapshot(run) if run else None  # as the weights about to load were
    net, processor, _ = load_for_inference(str(model))
    x_train = pooled_features(net, processor, [r["image"] for r in train], batch_size,
                              "features train")
    x_test = pooled_features(net, processor, [r["image"] for r in records], batch_size,
                             f"features {split}")
    train_truths = [truth_of(r) for r in train]
    columns: dict[str, list[str]] = {}
    conditional: dict[str, list[dict[str, float]]] = {}
    for a in ATTRIBUTES:
        idx = [i for i, t in enumerate(train_truths) if APPLIES[a](t)]
        fallback = "spiral" if a == "type" else DEFAULT_LABEL[a]
        columns[a], conditional[a] = _fit_predict(
            x_train[idx], [labels_of(train_truths[i])[a] for i in idx], x_test, fallback)
    preds = []
    for i in range(len(records)):
        p = {a: columns[a][i] for a in ATTRIBUTES}
        if p["type"] != "elliptical":
            p["shape"] = "none"
        if p["type"] != "spiral":
            p["bar"], p["arms"] = "no", "none"
        preds.append(p)
    probs = [probe_probabilities({a: conditional[a][i] for a in ATTRIBUTES})
             for i in range(len(records))]
    truths = [truth_of(r) for r in records]
    metrics = compute_metrics(truths, preds)
    metrics["calibration"] = calibration(truths, probs, [r.get("fractions") for r in records],
                                         rules=dataset_rules(data) or "reference")
    rows = prediction_rows(records, preds, [morphology_of(p).caption() for p in preds],
                           [None] * len(records), probs)
    full = write_eval(out, rows, metrics, name, kind="probe", model=inputs["model"],
                      split=inputs["split"],
                      run=run, data=inputs["data"], rules=dataset_rules(data),
                      probe={"train_n": len(train), "feature_dim": int(x_train.shape[1])},
                      training=training, inputs=inputs)
    print(format_table(with_majority(full, data, records)))
    print(format_calibration([full]))
    return full


def probe_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava probe``."""
    m = probe(args.model, args.data, split=args.split, out=args.out, overwrite=args.overwrite,
              allow_outside_paths=args.allow_outside_paths)
    print(f"wrote {Path(args.out) / 'predictions.jsonl'} and {Path(args.out) / 'metrics.json'}")
    return m
