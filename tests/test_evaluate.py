"""EVAL folders: errors, the majority baseline, and end-to-end evaluate
(beam search and grammar scores) on the tiny model. The pure metrics are tested in
test_metrics.py and test_calibration.py, the linear probe in test_probe.py, the training
snapshot in test_run_layout.py."""

from __future__ import annotations

import json

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.metrics import collapse_warning
from galaxy_llava.morphology import ATTRIBUTES
from test_metrics import PLAIN_SPIRAL, TRUTHS


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


@pytest.mark.parametrize("written", ["validation", "val"])
def test_validation_split_by_either_name(tmp_path, written):
    """`--split validation` (Hugging Face's name, what prepare writes) and `--split val` (the
    alias) choose the same galaxies, also in a dataset written with the old name; the EVAL
    folder records the one name."""
    from galaxy_llava.evaluate import load_split, majority_baseline

    data = _write_dataset(tmp_path / "data", splits=("train", written))
    chosen = load_split(data, "validation")
    assert len(chosen) == 4 and load_split(data, "val") == chosen
    for k, asked in enumerate(("validation", "val")):
        m = majority_baseline(data, split=asked, out=tmp_path / f"maj{k}")
        assert m["split"] == m["inputs"]["split"] == "validation" and m["n"] == 4


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
    # train split = galaxies 0, 2, 0, 2: half elliptical, so every galaxy gets 0.5 / 0.5
    assert all(r["probabilities"]["type"] == {"elliptical": 0.5, "spiral": 0.5} for r in rows)
    cal = saved["calibration"]["type"]
    assert cal["brier"] == pytest.approx(0.5) and cal["auroc"] == 0.5
    assert cal["vote_mse"] is None  # these records carry no vote fractions
    assert saved["rules"] is None  # no manifest.json to say


def _fake_run(folder, **config):
    """A run folder's training records: train_metrics.json, config.yaml and a loss log whose
    last line an interruption cut."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_metrics.json").write_text(json.dumps(
        {"method": "lora", "epochs": 2, "lr": 1e-4, "steps": 6, "wall_seconds": 12.0}))
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"method": "lora", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-4, **config}))
    (folder / "loss_log.jsonl").write_text(
        '{"step": 3, "epoch": 1.0, "loss": 2.5, "split": "train"}\n{"step": 6, "ep')
    return folder


def test_dataset_rules_come_from_the_manifest(prepared_dir, tmp_path):
    from galaxy_llava.evaluate import dataset_rules

    assert dataset_rules(prepared_dir) == "reference"
    assert dataset_rules(prepared_dir / "dataset.jsonl") == "reference"
    assert dataset_rules(tmp_path) is None


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
    from galaxy_llava.cli import main
    from galaxy_llava.records import load_records

    n_test = len(load_records(prepared_dir, "test"))
    argv = ["evaluate", "--model", str(tiny_model_dir), "--data", str(prepared_dir),
            "--out", str(tmp_path / "eval"), "--batch-size", "4", "--num-beams", "1",
            "--max-new-tokens", "8", "--limit", "3", "--no-scores"]
    assert main(argv) == 0
    metrics, rows = _check_eval_folder(tmp_path / "eval", "vlm", min(3, n_test))
    # --no-scores: beam search only
    assert "grammar" not in metrics and "probabilities" not in rows[0]
    assert metrics["inputs"]["scores"] is False
    assert metrics["parse_rate"] is not None and metrics["mean_length"] is not None
    assert metrics["run"] is None and metrics["split"] == "test"
    # the tiny model folder stores its family's default prompt, which the answers used
    from galaxy_llava.models.folders import read_prompt

    assert metrics["prompt_source"] == "model"
    assert metrics["prompt"] == read_prompt(tiny_model_dir)
    # a random model talks nonsense: every answer is still scored
    assert all(isinstance(r["prediction"], str) for r in rows)
    out = capsys.readouterr().out
    assert "exact" in out and f"and {tmp_path / 'eval' / 'metrics.json'}" in out
    assert main([*argv, "--split", "nope", "--overwrite"]) == 2
    assert "train" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_scores_the_grammar_and_snapshots_the_run(lora_run, prepared_dir, tmp_path,
                                                           capsys, monkeypatch):
    """Grammar-argmax metrics and calibration beside beam search's; the collapse warning; the
    run's training settings recorded. Beam search is replaced by one fixed answer (fast, and a
    sure collapse); the grammar scores run on the real model."""
    import shutil

    import galaxy_llava.generate
    from galaxy_llava.evaluate import evaluate
    from galaxy_llava.metrics import read_answer
    from galaxy_llava.records import load_records
    from galaxy_llava.scoring import grammar_scores

    run = shutil.copytree(lora_run[0], tmp_path / "run")
    _fake_run(run, seed=7)
    monkeypatch.setattr(galaxy_llava.generate, "describe_images",
                        lambda net, processor, paths, *a, **k: [PLAIN_SPIRAL] * len(paths))
    records = load_records(prepared_dir, "test")
    evaluate(run, prepared_dir, out=tmp_path / "eval", batch_size=4)
    captured = capsys.readouterr()
    metrics, rows = _check_eval_folder(tmp_path / "eval", "vlm", len(records))
    grammar = metrics["grammar"]
    # the terminal shows the calibration: AUROC and Zoobot's vote MSE per attribute
    shown = [ln.split() for ln in captured.out.splitlines() if ln.startswith("eval (grammar)")]
    type_row = next(r for r in shown if r[2] == "type")
    assert type_row[-3] == f"{grammar['calibration']['type']['auroc']:.3f}"
    assert type_row[-1] == str(grammar["calibration"]["type"]["vote_pairs"])
    assert grammar["rules"] == "reference" and grammar["n"] == len(records)
    assert grammar["parse_rate"] == 1.0  # the grammar's captions always parse
    assert grammar["exact_match"] == pytest.approx(
        sum(r["grammar"]["exact"] for r in rows) / len(rows))
    for r in rows:
        assert read_answer(r["grammar"]["best"])[1]
        for a in ATTRIBUTES:
            assert sum(r["probabilities"][a].values()) == pytest.approx(1.0)
    found = grammar_scores(lora_run[1], lora_run[2], [records[0]["image"]], "reference",
                           lora_run[3])
    assert rows[0]["grammar"]["best"] == found[0].best
    cal = grammar["calibration"]
    assert set(cal) == set(ATTRIBUTES) and sum(cal["type"]["reliability"]["count"]) == len(rows)
    assert 0 <= cal["type"]["ece"] <= 1 and 0 <= cal["type"]["brier"] <= 2
    assert cal["type"]["vote_mse"] is not None and cal["type"]["vote_pairs"] == len(rows)
    # beam search's metrics stay where they were; one fixed answer is a collapse
    assert metrics["attributes"]["type"]["accuracy"] == pytest.approx(
        sum(r["truth_attributes"]["type"] == "spiral" for r in rows) / len(rows))
    expected = collapse_warning([PLAIN_SPIRAL] * len(rows), [r["text"] for r in records])
    assert metrics["collapse_warning"] == expected
    if expected:  # the fixture's test split has more than two distinct captions
        assert captured.err.count(expected) == 1
    assert metrics["training"]["settings"]["lora_r"] == 4
    assert metrics["training"]["settings"]["seed"] == 7
    assert metrics["inputs"]["rules"] == "reference" and metrics["inputs"]["scores"] is True
    # the run's model card now shows this evaluation (what a Hub user reads)
    card = (run / "adapter" / "README.md").read_text()
    assert f"{100 * metrics['exact_match']:.1f}" in card and "eval" in card


def test_prompt_source_names_where_the_prompt_came_from(tiny_model_dir, tmp_path):
    import shutil

    from galaxy_llava.evaluate import _prompt_source

    assert _prompt_source(tiny_model_dir) == "model"
    folder = tmp_path / "no-prompt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "galaxy_llava.json").unlink()
    assert _prompt_source(folder) == "default"
    assert _prompt_source("no-such-org/no-such-model") == "default"  # a Hub id stores none
