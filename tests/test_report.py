"""The HTML report: self-contained, all sections present, mistakes marked, bad EVAL folders named,
and (slow) a real headless-Chromium render that is not blank."""

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
from galaxy_llava.metrics import compute_metrics, labels_of, read_answer
from galaxy_llava.morphology import Morphology
from galaxy_llava.report import build_report, load_eval, marked_answer
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
    for section in ("All metrics", "Accuracy per attribute", "Confusion matrices", "Training",
                    "Galaxies"):
        assert section in page
    assert page.count("data:image/png;base64,") >= 1 + 3 + 1  # bars, 3 confusions, losses
    assert page.count("data:image/jpeg;base64,") == 10  # one thumbnail per galaxy
    assert "95 s" in page and "12.5" in page  # wall time and speed of the run
    assert "1,234,567" in page and "0.533" in page  # trainable params, last val loss (3.2/6)
    assert 'class="bad"' in page and 'class="miss"' in page  # mistakes and omissions marked
    assert not list((tmp_path / "r").glob(".*tmp"))  # atomic write left no temp folder


def test_marked_answer_flags_wrong_and_missing_phrases():
    truth = Morphology("spiral", bar=True, arms="2").to_dict()
    text = "This is an image of a spiral galaxy, with three arms, purple."
    marked = marked_answer(text, truth)
    assert '<span class="ok">This is an image of a spiral galaxy</span>' in marked
    assert '<span class="bad">with three arms</span>' in marked
    assert '<span class="bad">purple</span>' in marked
    assert '<span class="miss">with a central bar</span>' in marked
    assert '<span class="miss">with two arms</span>' in marked
    perfect = marked_answer(Morphology.from_dict(truth).caption(), truth)
    assert "bad" not in perfect and "miss" not in perfect
    assert "empty" in marked_answer("", truth)


def test_marked_answer_reads_phrases_as_the_metrics_do():
    """An answer that does not open with a type clause is no caption: the metrics count every
    attribute wrong, so the report marks none of its phrases right."""
    truth = Morphology("spiral", bar=True)
    text = "With a central bar, This is an image of a spiral galaxy."
    assert set(read_answer(text)[0].values()) == {"unknown"}
    marked = marked_answer(text, truth.to_dict())
    assert 'class="ok"' not in marked and '<span class="miss">with a central bar</span>' in marked


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


def test_duplicate_names_and_missing_images_do_not_break(tmp_path):
    evals = _make_evals(tmp_path)
    shutil.rmtree(tmp_path / "images")
    out = build_report([evals[0], evals[0]], tmp_path / "report.html")
    page = out.read_text()
    assert "lora (2)" in page and "image missing" in page


CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "",
                             shutil.which("google-chrome") or "") if p and Path(p).exists()), None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from PIL import Image, ImageStat

    report = build_report(_make_evals(tmp_path, n=12), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
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
