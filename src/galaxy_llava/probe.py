"""The linear-probe baseline: logistic regressions on pooled frozen vision features.

What a fine-tuned VLM should beat: one scikit-learn logistic regression per attribute on the
mean of the frozen vision tower's output (the projector's input), fitted on the ``train`` split
where the attribute applies and scored on another split like the VLM (an EVAL folder of kind
"probe", :mod:`galaxy_llava.evaluate`). Its probabilities are read as the grammar's marginals read
(:func:`probe_probabilities`), so they are calibrated on the same terms as the VLM's.

"Zoobot-lite" (:func:`fit_vote_fractions`): where the records carry GZ2 vote fractions, the same
features also regress each question's vote fractions, and these probabilities are scored beside
the classifiers' as the predictor "NAME (votes)" (``metrics.json`` ``votes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from galaxy_llava.calibration import (MIN_ASKED, STATED_FOR, calibration, format_calibration,
                                      question_predictions)
from galaxy_llava.checks import number
from galaxy_llava.evaluate import (claim_eval, dataset_rules, eval_inputs, load_split,
                                   prediction_rows, truth_of, with_majority, write_eval)
from galaxy_llava.metrics import (APPLIES, DEFAULT_LABEL, compute_metrics, format_table,
                                  labels_of, morphology_of)
from galaxy_llava.models.preflight import preflight_model
from galaxy_llava.models.registry import family_for
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import load_image
from galaxy_llava.run_layout import run_path, training_snapshot


def pooled_features(net: Any, processor: Any, paths: Sequence[str], batch_size: int = 16,
                    desc: str = "features"):
    """Mean over image tokens of the frozen vision tower's selected layer (the projector's input,
    via the family's ``vision_features``), one ``(n, d)`` float32 row per image."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

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


def _fit_soft(x_train, soft, x_test):
    """A multinomial logistic regression fitted to soft targets (``soft``: ``(n, k)`` rows on
    the simplex, e.g. vote fractions): each row enters once per class, weighted by its share, so
    the fit minimises the cross-entropy between the predicted and the target distributions.
    Returns the ``(m, k)`` predicted distributions of ``x_test`` (a class no row has weight on
    gets 0; with fewer than two such classes, the mean of ``soft``)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, k = soft.shape
    present = [j for j in range(k) if soft[:, j].sum() > 0]
    out = np.zeros((len(x_test), k))
    if len(present) < 2:
        out[:] = soft.mean(axis=0) if n else 1.0 / k
        return out
    rows, labels = np.nonzero(soft > 0)
    weights = soft[rows, labels]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(x_train[rows], labels, standardscaler__sample_weight=weights,
            logisticregression__sample_weight=weights)
    proba = clf.predict_proba(x_test).astype("float64")
    out[:, clf.classes_] = proba / proba.sum(axis=1, keepdims=True)
    return out


def fit_vote_fractions(x_train, train_fractions: Sequence[dict | None], x_test,
                       classifier: Sequence[dict[str, dict[str, float]]],
                       rules: str = "reference") -> list[dict[str, dict[str, float]]]:
    """Zoobot-lite: per GZ2 question of ``rules``' vote targets, a multinomial logistic
    regression of the vote fractions on the frozen features (:func:`_fit_soft`), fitted on the
    training galaxies at least half of whose volunteers were asked the question (Zoobot's mask);
    the classes are the answers a caption label stands for plus "the rest". Returns, per test
    galaxy, each attribute's probabilities conditional on its question being asked, in the
    labels of the classifiers' ``classifier`` rows (:func:`_fit_predict`), which share out
    "the rest" among the labels without a GZ2 answer of their own (spiral vs edge-on disk, a bar's
    "no", a spiral's "none" arms); :func:`probe_probabilities` then reads them like the
    classifiers'. Why this and not a ridge per answer: its outputs lie on the simplex, and it
    minimises the cross-entropy to the fractions, which is what training the VLM on captions
    drawn from the votes minimises in expectation: the two are fitted to the same target. An
    attribute scored on every galaxy whose question only some volunteers reach (a prominent
    bulge, asked after "featured") is read as p(asked) p(label | asked), the share asked
    regressed the same way, as a caption drawn from the votes states it."""
    import numpy as np

    _, observed, asked, targets = question_predictions([{}] * len(train_fractions),
                                                       train_fractions, rules)
    out = [{a: dict(c[a]) for a in c} for c in classifier]
    for q, ts in targets.items():
        y = observed[q]
        keep = (asked[q] >= MIN_ASKED) & np.isfinite(y).all(axis=1)
        soft = np.clip(y[keep], 0.0, 1.0)
        soft = np.hstack([soft, np.clip(1.0 - soft.sum(axis=1, keepdims=True), 0.0, None)])
        soft /= np.maximum(soft.sum(axis=1, keepdims=True), 1e-12)
        pred = _fit_soft(x_train[keep], soft, x_test)
        for a in {t.attribute for t in ts}:
            mine = [(j, t.label) for j, t in enumerate(ts) if t.attribute == a]
            got = pred
            if a != "type" and a not in STATED_FOR:
                # scored on every galaxy, but asked of some: p(label) = p(asked) p(label | asked),
                # with p(asked) regressed too (a share of volunteers, like a fraction)
                known = np.isfinite(asked[q])
                share = np.clip(asked[q][known], 0.0, 1.0)
                got = pred * _fit_soft(x_train[known], np.stack([share, 1.0 - share], axis=1),
                                       x_test)[:, :1]
            named = {label for _, label in mine}
            for i, row in enumerate(out):
                # "the rest" goes to the other labels as the classifier shares them among
                # themselves (a spiral's "none" arms, spiral vs edge-on disk), else to the
                # attribute's not-said label
                others = {v: p for v, p in classifier[i][a].items() if v not in named}
                total = sum(others.values())
                if total <= 0:
                    others, total = {DEFAULT_LABEL.get(a, "spiral"): 1.0}, 1.0
                rest = max(1.0 - sum(got[i, j] for j, _ in mine), 0.0)
                row[a] = {label: float(got[i, j]) for j, label in mine}
                for v, p in others.items():
                    row[a][v] = row[a].get(v, 0.0) + rest * p / total
                norm = sum(row[a].values())
                row[a] = {v: p / norm for v, p in row[a].items()}
    return out


def _gate(labels: dict[str, str]) -> dict[str, str]:
    """One galaxy's predicted labels as a caption says them: shape only of a predicted
    elliptical, bar and arms only of a predicted spiral."""
    p = dict(labels)
    if p["type"] != "elliptical":
        p["shape"] = "none"
    if p["type"] != "spiral":
        p["bar"], p["arms"] = "no", "none"
    return p


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


def probe(model: str | Path, data: str | Path, *, split: str = "test",
          out: str | Path = "eval-probe", batch_size: int = 16, limit: int | None = None,
          name: str | None = None, overwrite: bool = False,
          allow_outside_paths: bool = False) -> dict:
    """Linear-probe baseline: one logistic regression per attribute on pooled frozen vision
    features, fitted on ``train`` where the attribute applies, scored on ``split``. The type
    prediction decides which of shape / bar / arms is stated; the probabilities
    (:func:`probe_probabilities`) are calibrated like the VLM's. Writes an EVAL folder."""
    number("--batch-size", batch_size, 1, integer=True)
    inputs = eval_inputs("probe", model, data, split, limit=limit)
    preflight_model(model)
    records = load_split(data, split, limit, allow_outside_paths)
    train = load_split(data, "train", allow_outside=allow_outside_paths)
    claim_eval(out, inputs, overwrite)
    from galaxy_llava.models.loading import load_for_inference

    run = run_path(model)
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
    preds = [_gate({a: columns[a][i] for a in ATTRIBUTES}) for i in range(len(records))]
    classifier = [{a: conditional[a][i] for a in ATTRIBUTES} for i in range(len(records))]
    probs = [probe_probabilities(c) for c in classifier]
    truths = [truth_of(r) for r in records]
    fractions = [r.get("fractions") for r in records]
    rules = dataset_rules(data) or "reference"
    metrics = compute_metrics(truths, preds)
    metrics["calibration"] = calibration(truths, probs, fractions, rules=rules)
    metrics["votes"] = None
    if all(r.get("fractions") for r in train):  # Zoobot-lite needs every galaxy's votes
        fitted = fit_vote_fractions(x_train, [r["fractions"] for r in train], x_test,
                                    classifier, rules)
        vote_probs = [probe_probabilities(c) for c in fitted]
        vote_preds = [_gate({a: max(c[a], key=c[a].get) for a in ATTRIBUTES}) for c in fitted]
        metrics["votes"] = {**compute_metrics(truths, vote_preds),
                            "calibration": calibration(truths, vote_probs, fractions, rules)}
    rows = prediction_rows(records, preds, [morphology_of(p).caption() for p in preds],
                           [None] * len(records), probs)
    if metrics["votes"]:
        for row, p in zip(rows, vote_probs):
            row["vote_probabilities"] = p
    full = write_eval(out, rows, metrics, name, kind="probe", model=inputs["model"],
                      split=inputs["split"],
                      run=run, data=inputs["data"], rules=dataset_rules(data),
                      probe={"train_n": len(train), "feature_dim": int(x_train.shape[1])},
                      training=training, inputs=inputs)
    print(format_table(with_majority(full, data, records)))
    print(format_calibration([full]))
    return full
