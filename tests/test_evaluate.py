"""Metrics on hand-made cases (numbers worked out by hand), EVAL-folder errors, and end-to-end
evaluate / probe / majority runs on the tiny model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.metrics import (attribute_metrics, format_table, labels_of, majority_labels,
                                  read_answer, score_captions, score_morphologies)
from galaxy_llava.morphology import ATTRIBUTES, Morphology

# Four galaxies: 5 true non-default values in all (round shape, prominent bulge; disturbed;
# bar, two arms), galaxy 4 is the plain spiral.
TRUTHS = [
    Morphology("elliptical", shape="round", prominent_bulge=True),
    Morphology("elliptical", disturbed=True),
    Morphology("spiral", bar=True, arms="2"),
    Morphology("spiral"),
]
PLAIN_SPIRAL = "This is an image of a spiral galaxy."


def test_perfect_predictor_scores_one_everywhere():
    m = score_captions(TRUTHS, [t.caption() for t in TRUTHS])
    assert m["n"] == 4
    for key in ("exact_match", "parse_rate"):
        assert m[key] == 1.0
    assert m["hallucination_rate"] == 0.0 and m["omission_rate"] == 0.0
    for a in ATTRIBUTES:
        assert m["attributes"][a]["accuracy"] == 1.0, a
        assert m["attributes"][a]["macro_f1"] == 1.0, a
    assert m["mean_length"] == m["truth_mean_length"]
    assert m["counts"]["asserted"] == m["counts"]["true_attributes"] == 5


def test_always_plain_spiral_known_numbers():
    m = score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)
    att = {a: m["attributes"][a] for a in ATTRIBUTES}
    assert att["type"]["accuracy"] == 0.5
    # elliptical F1 = 0 (never predicted), spiral F1 = 2*2/(2*2+2+0) = 2/3
    assert att["type"]["macro_f1"] == pytest.approx(1 / 3)
    assert (att["shape"]["n"], att["shape"]["accuracy"]) == (2, 0.5)  # ellipticals only
    assert (att["bar"]["n"], att["bar"]["accuracy"]) == (2, 0.5)  # spirals only
    assert (att["arms"]["n"], att["arms"]["accuracy"]) == (2, 0.5)
    assert att["prominent_bulge"]["accuracy"] == 0.75
    assert att["boxy_bulge"]["accuracy"] == 1.0 and att["boxy_bulge"]["n"] == 4
    assert att["disturbed"]["accuracy"] == 0.75
    assert m["exact_match"] == 0.25  # only the plain spiral
    assert m["parse_rate"] == 1.0
    assert m["hallucination_rate"] is None  # nothing asserted: the rate cannot apply
    assert m["omission_rate"] == 1.0  # all 5 true values missed
    assert m["mean_length"] == 8.0


def test_always_empty_known_numbers():
    m = score_captions(TRUTHS, [""] * 4)
    for a in ATTRIBUTES:  # not a caption: wrong everywhere, no credit for "not said" defaults
        assert m["attributes"][a]["accuracy"] == 0.0, a
        assert m["attributes"][a]["confusion"]["labels"][-1] == "unknown"
    assert m["exact_match"] == 0.0 and m["parse_rate"] == 0.0
    assert m["hallucination_rate"] is None and m["omission_rate"] == 1.0
    assert m["mean_length"] == 0.0


def test_empty_and_unparseable_answers_are_counted():
    m = score_captions(TRUTHS, ["", None, "A fuzzy blob, with arms.", PLAIN_SPIRAL + " It is red."])
    assert m["n"] == 4
    assert m["parse_rate"] == 0.25  # text after the full stop is ignored by the grammar
    att = m["attributes"]
    assert "unknown" in att["type"]["confusion"]["labels"]
    assert att["type"]["accuracy"] == 0.25  # only galaxy 4 (spiral) right
    assert att["shape"]["accuracy"] == 0.0  # galaxies 1, 2: no answer
    assert att["bar"]["accuracy"] == 0.5  # galaxy 4 right, galaxy 3 no answer
    assert att["boxy_bulge"]["accuracy"] == 0.25
    assert m["exact_match"] == 0.25
    assert m["counts"]["asserted"] == 0 and m["omission_rate"] == 1.0
    labels, ok, _ = read_answer("")
    assert set(labels.values()) == {"unknown"} and ok is False
    # a garbage phrase makes the answer unparsed but the recognised phrases still count
    labels, ok, _ = read_answer("This is an image of a spiral galaxy, with a central bar, sparkly.")
    assert ok is False and labels["type"] == "spiral" and labels["bar"] == "yes"
    assert labels["arms"] == "none"


def test_hallucination_and_omission_counts():
    preds = [
        "This is an image of an elliptical galaxy, nearly round in shape, disturbed or merging "
        "with another galaxy.",  # round right; disturbed hallucinated; prominent bulge omitted
        "This is an image of an elliptical galaxy, disturbed or merging with another galaxy.",
        "This is an image of a spiral galaxy, with three arms.",  # arms wrong; bar omitted
        "This is an image of a spiral galaxy, boxy bulge at its center.",  # boxy hallucinated
    ]
    m = score_captions(TRUTHS, preds)
    # asserted: round, disturbed | disturbed | 3 arms | boxy = 5; wrong: disturbed, 3 arms, boxy
    assert m["counts"]["asserted"] == 5 and m["counts"]["hallucinated"] == 3
    assert m["hallucination_rate"] == pytest.approx(3 / 5)
    # true: round, bulge | disturbed | bar, 2 arms = 5; missed: bulge, bar, arms
    assert m["counts"]["omitted"] == 3
    assert m["omission_rate"] == pytest.approx(3 / 5)
    assert m["exact_match"] == 0.25


def test_confusion_matrix_rows_truth_columns_prediction():
    a = attribute_metrics(["yes", "yes", "no", "no", "no"], ["yes", "no", "no", "yes", "no"],
                          ("no", "yes"))
    assert a["confusion"] == {"labels": ["no", "yes"], "matrix": [[2, 1], [1, 1]]}
    assert a["accuracy"] == pytest.approx(3 / 5)
    # F1(no) = 4/(4+1+1), F1(yes) = 2/(2+1+1)
    assert a["macro_f1"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    empty = attribute_metrics([], [], ("no", "yes"))
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["macro_f1"] is None


def test_caption_free_predictions_have_null_text_fields():
    m = score_morphologies(TRUTHS, TRUTHS)
    assert m["parse_rate"] is None and m["mean_length"] is None
    assert m["exact_match"] == 1.0 and m["hallucination_rate"] == 0.0
    json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere


def test_majority_labels_per_applicable_subset():
    train = [Morphology("spiral", bar=True), Morphology("spiral", bar=True), Morphology("spiral"),
             Morphology("elliptical", shape="cigar")]
    maj = majority_labels(train)
    assert maj["type"] == "spiral" and maj["bar"] == "yes"
    assert maj["shape"] == "cigar"  # the only elliptical's shape, not the spirals' "none"
    assert maj["disturbed"] == "no"
    assert labels_of(Morphology("spiral", arms="many"))["arms"] == "many"


def test_format_table_shows_percent_and_dashes():
    m = {"name": "probe", **score_morphologies(TRUTHS, TRUTHS)}
    text = format_table([m, {"name": "plain", **score_captions(TRUTHS, [PLAIN_SPIRAL] * 4)}])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "n", "type"]
    assert "100.0%" in lines[2] and "-" in lines[2].split()
    assert "50.0%" in lines[3] and "8.0" in lines[3]


def _write_dataset(folder, splits=("train", "test")):
    """A minimal prepared dataset (records + tiny images) without the prepare module."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    lines = []
    for i, m in enumerate(TRUTHS * 2):
        img = f"images/{i}.jpg"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / img)
        lines.append({"image": img, "text": m.caption(), "id_str": f"g{i}",
                      "split": splits[i % len(splits)], "morphology": m.to_dict(),
                      "fractions": {}})
    (folder / "dataset.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_unknown_split_lists_splits(tmp_path):
    from galaxy_llava.evaluate import majority_baseline

    data = _write_dataset(tmp_path / "data")
    with pytest.raises(UserError, match=r"(?s)validation.*train.*test|train, test"):
        majority_baseline(data, split="validation", out=tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_majority_baseline_writes_eval_folder(tmp_path):
    from galaxy_llava.evaluate import majority_baseline

    data = _write_dataset(tmp_path / "data")
    m = majority_baseline(data, split="test", out=tmp_path / "maj")
    saved = json.loads((tmp_path / "maj" / "metrics.json").read_text())
    assert saved == m and list(saved)[-1] == "complete" and saved["kind"] == "majority"
    assert saved["parse_rate"] is None and saved["n"] == 4
    rows = [json.loads(x) for x in (tmp_path / "maj" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) >= {"id_str", "image", "truth", "prediction", "parsed",
                                               "ok", "parsed_ok"}
    # test split = galaxies 1, 3, 1, 3 of TRUTHS (elliptical disturbed, plain spiral)
    assert saved["attributes"]["type"]["accuracy"] == pytest.approx(
        sum(r["ok"]["type"] for r in rows) / 4)


# ------------------------------------------------------------------ end to end (tiny model)

def _check_eval_folder(folder, kind, n):
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["kind"] == kind and metrics["n"] == n and metrics["complete"] is True
    assert list(metrics)[-1] == "complete"
    for key in ("exact_match", "hallucination_rate", "omission_rate", "mean_length", "parse_rate"):
        assert key in metrics
    for a in ATTRIBUTES:
        att = metrics["attributes"][a]
        assert {"accuracy", "macro_f1", "n", "confusion"} <= set(att)
        if att["n"]:
            assert 0.0 <= att["accuracy"] <= 1.0
            assert sum(map(sum, att["confusion"]["matrix"])) == att["n"]
    rows = (folder / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == n
    return metrics, [json.loads(r) for r in rows]


@pytest.mark.slow
def test_evaluate_end_to_end_on_tiny_model(tiny_model_dir, prepared_dir, tmp_path, capsys):
    from galaxy_llava.evaluate import evaluate_cli
    from galaxy_llava.records import load_records

    n_test = len(load_records(prepared_dir, "test"))
    args = SimpleNamespace(model=str(tiny_model_dir), data=prepared_dir, split="test",
                           out=tmp_path / "eval", batch_size=4, num_beams=1, max_new_tokens=8,
                           limit=3, overwrite=False, allow_outside_paths=False)
    evaluate_cli(args)
    metrics, rows = _check_eval_folder(tmp_path / "eval", "vlm", min(3, n_test))
    assert metrics["parse_rate"] is not None and metrics["mean_length"] is not None
    assert metrics["run"] is None and metrics["split"] == "test"
    # the tiny model folder stores its family's default prompt, which the answers used
    from galaxy_llava.models.folders import read_prompt

    assert metrics["prompt_source"] == "model"
    assert metrics["prompt"] == read_prompt(tiny_model_dir)
    # a random model talks nonsense: every answer is still scored
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert "exact" in capsys.readouterr().out
    with pytest.raises(UserError, match="train"):
        evaluate_cli(SimpleNamespace(**{**vars(args), "split": "nope"}))


def test_prompt_source_names_where_the_prompt_came_from(tiny_model_dir, tmp_path):
    import shutil

    from galaxy_llava.evaluate import _prompt_source

    assert _prompt_source(tiny_model_dir) == "model"
    folder = tmp_path / "no-prompt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "galaxy_llava.json").unlink()
    assert _prompt_source(folder) == "default"
    assert _prompt_source("no-such-org/no-such-model") == "default"  # a Hub id stores none


def test_pooled_features_are_the_mean_of_each_images_encoder_output(tiny_model_dir,
                                                                   prepared_dir):
    import torch

    from galaxy_llava.evaluate import pooled_features
    from galaxy_llava.models.loading import load_model
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_image, load_records

    net, processor = load_model(tiny_model_dir)
    family = family_for(net)
    paths = [r["image"] for r in load_records(prepared_dir, "train")[:3]]
    got = pooled_features(net, processor, paths, batch_size=2, desc="test")
    assert got.shape == (3, net.config.vision_config.hidden_size) and got.dtype == "float32"
    with torch.no_grad():
        want = [family.vision_features(net, family.image_inputs(processor, load_image(p)))
                .float().mean(dim=1)[0].numpy() for p in paths]
    assert all(abs(got[i] - want[i]).max() < 1e-5 for i in range(3))
    assert abs(got[0] - got[1]).max() > 1e-4  # one row per image, not one per batch


@pytest.mark.slow
def test_probe_end_to_end_on_tiny_model(tiny_model_dir, prepared_dir, tmp_path):
    from galaxy_llava.evaluate import probe_cli
    from galaxy_llava.records import load_records

    n_test = len(load_records(prepared_dir, "test"))
    probe_cli(SimpleNamespace(model=str(tiny_model_dir), data=prepared_dir, split="test",
                              out=tmp_path / "probe", overwrite=False,
                              allow_outside_paths=False))
    metrics, rows = _check_eval_folder(tmp_path / "probe", "probe", n_test)
    assert metrics["parse_rate"] is None and metrics["mean_length"] is None
    assert metrics["hallucination_rate"] is None or 0 <= metrics["hallucination_rate"] <= 1
    assert metrics["probe"]["feature_dim"] > 0
    assert all(r["parsed_ok"] is None for r in rows)
    assert not math.isnan(metrics["attributes"]["type"]["accuracy"])
