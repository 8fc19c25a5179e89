"""The HTML report: self-contained, all sections present (calibration, settings), mistakes
marked, bad EVAL folders named, parent folders of EVAL folders, the training snapshot preferred
to the run folder, and (slow) a real headless-Chromium render that is not blank. The charts and
the grid of galaxies have their own files (test_report_charts.py, test_report_galaxies.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.evaluate import prediction_rows, write_eval
from galaxy_llava.calibration import calibration, majority_probabilities
from galaxy_llava.metrics import compute_metrics, labels_of, read_answer, score_captions
from galaxy_llava.morphology import Morphology
from galaxy_llava.report import build_report, confusion_tables, eval_folders, load_eval
from galaxy_llava.rules import rule_set


def _galaxy_image(path: Path, m: Morphology, rng: random.Random) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    im = Image.new("RGB", (64, 64), (4, 4, 12))
    d = ImageDraw.Draw(im)
    w = 22 if m.shape in (None, "round") else 12 if m.shape == "in-between" else 6
    colour = (255, 220, 170) if m.type == "elliptical" else (170, 200, 255)
    d.ellipse((32 - 22, 32 - w, 32 + 22, 32 + w), fill=colour)
    if m.type == "spiral":
        d.arc((8, 8, 56, 56), rng.randint(0, 180), rng.randint(200, 340), fill=(90, 140, 255), width=3)
    im.filter(ImageFilter.GaussianBlur(3)).save(path)


def _make_evals(root: Path, n: int = 10) -> list[Path]:
    """Three finished EVAL folders (a VLM with its run folder, a probe, a majority baseline)."""
    rng = random.Random(0)
    pool = rule_set("reference").reachable()
    truths = [rng.choice(pool) for _ in range(n)]
    (root / "images").mkdir(parents=True)
    records = []
    for i, t in enumerate(truths):
        img = root / "images" / f"{i}.png"
        _galaxy_image(img, t, rng)
        records.append({"id_str": f"J{i:04d}", "image": str(img), "text": t.caption(),
                        "morphology": t.to_dict(), "split": "test"})
    # root is the prepared dataset the images belong to: the report embeds images from there
    (root / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = root / "runs" / "lora"
    run.mkdir(parents=True)
    (run / "train_metrics.json").write_text(json.dumps(
        {"method": "lora", "epochs": 3, "steps": 30, "wall_seconds": 95.2,
         "samples_per_second": 12.5, "trainable_parameters": 1234567, "device": "cpu"}))
    loss = [{"step": s, "epoch": s / 10, "loss": 3 / (1 + s / 5), "split": "train"}
            for s in range(1, 31)]
    loss += [{"step": s, "epoch": s / 10, "loss": 3.2 / (1 + s / 6), "split": "val"}
             for s in (10, 20, 30)]
    (run / "loss_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in loss) + '{"cut')
    (run / "config.yaml").write_text("method: lora\nlora_r: 12\nlearning_rate: 0.000321\n"
                                     "seed: 1234\n")

    # The VLM gets most right, some attributes wrong, one empty and one ungrammatical answer.
    texts = [t.caption() for t in truths]
    texts[1] = ""
    texts[2] = "A galaxy, shiny."
    texts[3] = Morphology(truths[3].type, disturbed=not truths[3].disturbed).caption()
    answers = [read_answer(x) for x in texts]
    out = []
    for name, kind, preds, txts, ok, extra in (
        ("lora", "vlm", [a[0] for a in answers], texts, [a[1] for a in answers],
         {"run": str(run), "parse": True}),
        ("probe", "probe", [labels_of(Morphology("spiral", bar=True))] * n,
         [Morphology("spiral", bar=True).caption()] * n, [None] * n, {"run": None}),
        ("majority", "majority", [labels_of(Morphology("elliptical"))] * n,
         [Morphology("elliptical").caption()] * n, [None] * n, {"run": str(root / "gone")}),
    ):
        metrics = compute_metrics(truths, preds, ok if extra.pop("parse", False) else None,
                                  txts if kind == "vlm" else None)
        probs = [majority_probabilities(truths[:5])] * n  # some probabilities to calibrate
        if kind == "vlm":  # the grammar's best caption: the truth but for galaxy 0's type
            best = [t.caption() for t in truths]
            best[0] = Morphology("spiral" if truths[0].type == "elliptical" else "elliptical"
                                 ).caption()
            metrics["grammar"] = {**compute_metrics(truths, [read_answer(b)[0] for b in best],
                                                    [True] * n, best),
                                  "calibration": calibration(truths, probs)}
            extra.update(prompt="USER: <image>\nDescribe this galaxy.\nASSISTANT:",
                         generation={"num_beams": 3, "max_new_tokens": 40}, rules="reference")
        elif kind == "probe":
            metrics["calibration"] = calibration(truths, probs)
            metrics["votes"] = {**compute_metrics(truths, [labels_of(t) for t in truths]),
                                "calibration": calibration(truths, probs)}
        folder = root / "eval" / name
        write_eval(folder, prediction_rows(records, preds, txts, ok), metrics, kind=kind,
                   model="m", split="test", data=str(root), **extra)
        out.append(folder)
    return out


def test_report_is_self_contained_and_complete(tmp_path):
    evals = _make_evals(tmp_path)
    out = build_report(evals, tmp_path / "r" / "report.html")
    page = out.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page), "every resource must be embedded"
    assert "http://" not in page and "https://" not in page
    for name in ("lora", "probe", "majority"):
        assert f">{name}<" in page or f">{name} " in page
    for section in ("All metrics", "Accuracy per attribute", "Calibration", "Confusion matrices",
                    "Settings", "Training", "Galaxies"):
        assert section in page
    assert page.count("data:image/png;base64,") == 3  # bars, reliability, losses
    # confusion tables of 5 predictors (lora, lora (grammar), probe, probe (votes), majority),
    # 7 attributes
    assert page.count('<div class="cm">') == 5 * 7
    assert ">lora (grammar)<" in page and 'alt="reliability diagrams"' in page
    assert ">probe (votes)<" in page and "Zoobot-lite" in page
    for header in ("accuracy [95% CI]", "macro-F1", "Brier", "ECE", "AUROC", "vote MSE"):
        assert header in page
    # the metrics as the field computes them, said under the table
    assert "binary, on p(yes)" in page and "half of whose volunteers were asked" in page
    # settings: prompt, decoding, rules, seed, learning rate, LoRA rank
    for shown in ("Describe this galaxy.", "beam search (3 beams)", "reference", ">1234<",
                  ">0.000321<", ">12<"):
        assert shown in page, shown
    assert page.count("data:image/jpeg;base64,") == 10  # one thumbnail per galaxy
    assert "95 s" in page and "12.5" in page  # wall time and speed of the run
    assert "1,234,567" in page and "0.533" in page  # trainable params, last val loss (3.2/6)
    assert 'class="bad"' in page and 'class="miss"' in page  # mistakes and omissions marked
    assert not list((tmp_path / "r").glob(".*tmp"))  # atomic write left no temp folder


def test_a_parent_folder_stands_for_its_eval_folders(tmp_path):
    evals = _make_evals(tmp_path)
    assert eval_folders([tmp_path / "eval"]) == evals  # VLMs, then the probe, then majority
    assert eval_folders([evals[1]]) == [evals[1]]
    page = build_report([tmp_path / "eval"], tmp_path / "report.html").read_text()
    for name in ("lora", "probe", "majority"):
        assert f">{name} " in page or f">{name}<" in page
    with pytest.raises(UserError, match="did not finish"):
        build_report([tmp_path / "images"], tmp_path / "other.html")  # no EVAL folder in it


def test_the_report_shows_the_training_recorded_at_evaluation_time(tmp_path):
    evals = _make_evals(tmp_path)
    run = tmp_path / "runs" / "lora"
    # the run is resumed after the evaluation: more epochs, another seed, longer
    (run / "train_metrics.json").write_text(json.dumps(
        {"method": "lora", "epochs": 9, "steps": 90, "wall_seconds": 600.0}))
    (run / "config.yaml").write_text("method: lora\nlora_r: 12\nseed: 99\n")
    page = build_report(evals, tmp_path / "report.html").read_text()
    assert "95 s" in page and ">1234<" in page  # the snapshot's wall time and seed
    assert "10.0 min" not in page and ">99<" not in page
    # an EVAL folder from before the snapshot reads the run folder as it is now, and says so
    metrics = json.loads((evals[0] / "metrics.json").read_text())
    del metrics["training"]
    (evals[0] / "metrics.json").write_text(json.dumps(metrics))
    page = build_report(evals, tmp_path / "report2.html").read_text()
    assert "10.0 min" in page and ">99<" in page and "as it is now" in page


def test_confusion_tables_count_truth_against_prediction():
    truths = [Morphology("spiral"), Morphology("spiral"), Morphology("elliptical")]
    text = confusion_tables(score_captions(truths, [t.caption() for t in truths[1:]] + [""]))
    table = text[text.index("<b>type</b>"):text.index("<b>shape</b>")]
    # rows (truth) and columns (prediction): elliptical, spiral, unknown. The elliptical got
    # no answer (unknown); one spiral was called elliptical, the other spiral.
    counts = [int(c) for c in re.findall(r">(\d+)</td>", table)]
    assert counts == [0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert "acc 33%, n=3" in table


def test_unfinished_eval_folder_is_named(tmp_path):
    evals = _make_evals(tmp_path)
    (evals[1] / "metrics.json").unlink()
    with pytest.raises(UserError, match=re.escape(str(evals[1])) + ".*did not finish"):
        build_report(evals, tmp_path / "report.html")
    with pytest.raises(UserError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "report.html")
    (evals[1] / "metrics.json").write_text('{"n": 3}')
    with pytest.raises(UserError, match="not a finished"):
        load_eval(evals[1])
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("bad, words", [
    ({"truth_attributes": {"type": "blob"}}, "not a valid morphology (unknown galaxy type"),
    ({"truth_attributes": {"colour": "red"}}, "not a valid morphology (unknown morphology keys"),
    ({"truth_attributes": ["spiral"]}, "'truth_attributes' must be an object"),
    ({"prediction": 3}, "'prediction' must be a string"),
    ({"grammar": "spiral"}, "'grammar' must be an object"),
    ({"id_str": ["J1"]}, "'id_str' must be a string or a number"),
])
def test_a_malformed_prediction_row_is_a_one_line_error_naming_its_line(tmp_path, capsys, bad,
                                                                        words):
    from galaxy_llava.cli import main

    evals = _make_evals(tmp_path, n=4)
    pfile = evals[0] / "predictions.jsonl"
    rows = [json.loads(line) for line in pfile.read_text().splitlines()]
    rows[2].update(bad)
    pfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.html"
    assert main(["report", str(evals[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{pfile} line 3: " in err and words in err, err
    assert not out.exists()


def test_duplicate_names_and_missing_images_do_not_break(tmp_path):
    evals = _make_evals(tmp_path)
    shutil.rmtree(tmp_path / "images")
    out = build_report([evals[0], evals[0]], tmp_path / "report.html")
    page = out.read_text()
    assert "lora (2)" in page and "image missing" in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, chromium):
    from PIL import Image, ImageStat

    report = build_report(_make_evals(tmp_path, n=12), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1400,3000", report.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        stat = ImageStat.Stat(im.convert("L"))
        assert stat.stddev[0] > 20, "screenshot looks blank"
        colours = im.convert("RGB").resize((140, 300)).getcolors(140 * 300)
        assert colours is not None and len(colours) > 50
    keep = Path("/tmp/galaxy_llava_report_screenshot.png")
    shutil.copy(shot, keep)  # for a human look after the run
