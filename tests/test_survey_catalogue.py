"""catalogue: parquet rows equal describe's captions and the grammar's scores; parts, shards and
resumes give the same rows as one uninterrupted run; bad input writes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from galaxy_llava.survey_catalogue import MANIFEST, part_name
from galaxy_llava.scoring import value_column
from galaxy_llava.cli import main
from galaxy_llava.morphology import ATTRIBUTES

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random LLaVA, built once for this module."""
    from galaxy_llava.toy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("catalogue-model") / "m", seed=0)


@pytest.fixture(scope="module")
def images(prepared_dir, tmp_path_factory):
    """10 of the prepared dataset's images in a nested folder tree (plus a non-image file)."""
    folder = tmp_path_factory.mktemp("catalogue-images") / "imgs"
    files = sorted((prepared_dir / "images").iterdir())[:10]
    for k, f in enumerate(files):
        target = folder / ("a" if k < 5 else "b") / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(*args) -> int:
    return main(["catalogue", *map(str, args)])


def read(out: Path) -> pd.DataFrame:
    """Every part, in part order, as one frame (``datasets`` reads the same files)."""
    parts = sorted(out.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


@pytest.fixture(scope="module")
def reference(model, images, tmp_path_factory):
    """One uninterrupted single-process run: 10 images in parts of 4 (3 parts)."""
    out = tmp_path_factory.mktemp("catalogue-ref") / "cat"
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4, *FAST) == 0
    return out


def test_rows_equal_describe_and_grammar_scores(model, prepared_dir, tmp_path):
    from galaxy_llava.generate import describe_paths
    from galaxy_llava.models.loading import load_for_inference
    from galaxy_llava.scoring import grammar_scores

    out = tmp_path / "cat"
    # The dataset folder itself: only images/ is catalogued, never preview.png.
    assert run("--model", model, "--images", prepared_dir, "--out", out, "--part-size", 4,
               "--caption", "both", *FAST) == 0
    rows = read(out)
    described = describe_paths(model, [prepared_dir / "images"], batch_size=2, num_beams=2,
                               max_new_tokens=8)
    assert len(rows) == len(described) == len(list((prepared_dir / "images").iterdir()))
    assert rows["image"].tolist() == [os.path.abspath(d["image"]) for d in described]
    from galaxy_llava.records import load_records

    # A prepared dataset's images are named by their galaxy's id_str.
    ids = {os.path.abspath(r["image"]): r["id_str"] for r in load_records(prepared_dir)}
    assert rows["id"].tolist() == [str(ids[os.path.abspath(d["image"])]) for d in described]
    assert rows["id"].tolist() != [Path(d["image"]).stem for d in described]
    # The same dataset through a link, or its images/ folder alone: the same ids.
    link = tmp_path / "link"
    link.symlink_to(prepared_dir)
    for folder in (link, prepared_dir / "images"):
        other = tmp_path / f"cat-{folder.name}"
        assert run("--model", model, "--images", folder, "--out", other, "--part-size", 4,
                   "--no-scores", *FAST) == 0
        assert read(other)["id"].tolist() == rows["id"].tolist()
    assert rows["caption"].tolist() == [d["caption"] for d in described]

    net, processor, prompt = load_for_inference(model)
    # The catalogue's batches of 2 (images scored together round alike, bit for bit).
    scores = grammar_scores(net, processor, rows["image"].tolist(), "reference", prompt,
                            batch_size=2)
    assert rows["best_caption"].tolist() == [s.best for s in scores]
    for (_, row), s in zip(rows.iterrows(), scores):
        assert row["entropy"] == pytest.approx(s.entropy, abs=1e-9)
        for a in ATTRIBUTES:
            assert row[value_column(a, max(s.marginals[a], key=s.marginals[a].get))] \
                == pytest.approx(max(s.marginals[a].values()), abs=1e-9)
            for v, p in s.marginals[a].items():
                assert row[value_column(a, v)] == pytest.approx(p, abs=1e-9)
            total = sum(row[c] for c in rows.columns if c.startswith(f"p_{a}_"))
            assert total == pytest.approx(1.0, abs=1e-9)
    # The predicted values are the best caption's; yes/no attributes are booleans.
    from galaxy_llava.scoring import BOOLEAN
    from galaxy_llava.morphology import parse_caption, value_label

    assert BOOLEAN == ("bar", "prominent_bulge", "boxy_bulge", "disturbed")
    assert all(rows[a].dtype == bool for a in BOOLEAN)
    for _, row in rows.iterrows():
        best = parse_caption(row["best_caption"])
        assert [row[a] for a in ATTRIBUTES] == [
            getattr(best, a) if a in BOOLEAN else value_label(best, a) for a in ATTRIBUTES]


def test_default_caption_is_the_grammars_best_without_beam_search(model, images, reference,
                                                                  monkeypatch, tmp_path):
    """``--caption grammar`` (the default): each row's caption is its best caption, and beam
    search never runs; the scores are those of ``--caption both``."""
    import galaxy_llava.generate

    def no_beams(*args, **kwargs):
        raise AssertionError("beam search ran")

    monkeypatch.setattr(galaxy_llava.generate, "describe_images", no_beams)
    out = tmp_path / "cat"
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4, *FAST) == 0
    rows = read(out)
    assert rows["caption"].tolist() == rows["best_caption"].tolist()
    both = tmp_path / "both"
    monkeypatch.undo()
    assert run("--model", model, "--images", images, "--out", both, "--part-size", 4,
               "--caption", "both", *FAST) == 0
    other = read(both)
    assert rows.drop(columns="caption").equals(other.drop(columns="caption"))
    assert rows["caption"].tolist() != other["caption"].tolist()  # the random model's beams


def test_caption_modes_and_no_scores(model, images, tmp_path, capsys):
    """``--no-scores`` is ``--caption beam``; asking for the grammar's caption without scores
    is one line, exit 2, nothing written."""
    beam, plain = tmp_path / "beam", tmp_path / "plain"
    assert run("--model", model, "--images", images, "--out", beam, "--caption", "beam",
               *FAST) == 0
    assert run("--model", model, "--images", images, "--out", plain, "--no-scores", *FAST) == 0
    pd.testing.assert_frame_equal(read(beam), read(plain))
    assert "best_caption" not in read(beam).columns
    out = tmp_path / "bad"
    capsys.readouterr()
    assert run("--model", model, "--images", images, "--out", out, "--caption", "grammar",
               "--no-scores", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "--caption grammar needs the grammar scores" in err and "\n" not in err
    assert not out.exists()


def test_output_is_a_parquet_dataset_with_provenance(reference):
    import datasets
    import json

    import pyarrow.parquet as pq

    ds = datasets.load_dataset("parquet", data_files=str(reference / "*.parquet"))["train"]
    assert ds.num_rows == 10 and {"id", "image", "caption", "best_caption", "entropy",
                                  *ATTRIBUTES} <= set(ds.column_names)
    assert sorted(p.name for p in reference.iterdir()) == [MANIFEST] + [
        part_name(i) for i in range(3)]
    meta = json.loads(pq.read_schema(reference / part_name(0)).metadata[b"galaxy_llava"])
    assert meta["rules"] == "reference" and meta["prompt"] and meta["package"].startswith(
        "galaxy-llava ")
    assert meta["decoding"] == {"num_beams": 2, "max_new_tokens": 8, "batch_size": 2,
                                "do_sample": False}
    assert meta["model"] == str(Path(meta["model"]).resolve())


def test_two_shards_give_the_rows_of_one_run(model, images, reference, tmp_path):
    out = tmp_path / "cat"
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4,
               "--shard", "1/2", *FAST) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [part_name(1)]
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4,
               "--shard", "0/2", *FAST) == 0
    pd.testing.assert_frame_equal(read(out), read(reference))


def test_torchrun_ranks_split_the_parts(model, images, reference, tmp_path, monkeypatch):
    out = tmp_path / "cat"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run("--model", model, "--images", images, "--out", out, "--part-size", 4,
                   *FAST) == 0
        assert len(list(out.glob("*.parquet"))) == (2 if rank == 0 else 3)
    pd.testing.assert_frame_equal(read(out), read(reference))


@pytest.mark.slow
def test_two_torchrun_processes_give_the_rows_of_one_process(model, images, reference,
                                                             tmp_path):
    """A real 2-process launch (torchrun on the CPU): each rank writes its parts, and together
    they are exactly the single-process catalogue."""
    out = tmp_path / "cat"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "galaxy_llava", "catalogue", "--model", str(model), "--images", str(images),
           "--out", str(out), "--part-size", "4", *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("this process wrote") == 2
    pd.testing.assert_frame_equal(read(out), read(reference))


@pytest.mark.slow
def test_test_split_captions_equal_evaluate_predictions(lora_run, prepared_dir, tmp_path):
    """The catalogue of a whole prepared dataset (every split, in file order, default batches)
    gives the test split's galaxies exactly the captions ``evaluate`` predicted for them."""
    import json

    from galaxy_llava.evaluate import evaluate

    run_dir = shutil.copytree(lora_run[0], tmp_path / "run")  # evaluate adds to its card
    out = tmp_path / "cat"
    assert run("--model", run_dir, "--images", prepared_dir, "--out", out, "--no-scores") == 0
    rows = read(out).set_index("image")
    evaluate(run_dir, prepared_dir, split="test", out=tmp_path / "eval")
    predictions = [json.loads(line) for line in
                   (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert predictions
    for p in predictions:
        image = str((prepared_dir / p["image"]).resolve()) if not os.path.isabs(p["image"]) \
            else p["image"]
        assert rows.loc[image, "caption"] == p["prediction"], p["id_str"]


def test_path_lists_and_fits_cutouts(model, images, tmp_path):
    """A CSV and a parquet list of paths (relative to the list, with ids) and a folder of FITS
    cutouts: rows in list order with the list's ids; a FITS image is read like its PNG."""
    import numpy as np
    from astropy.io import fits
    from PIL import Image

    from galaxy_llava.generate import describe_paths

    files = sorted(images.rglob("*.png")) + sorted(images.rglob("*.jpg"))
    chosen = files[:3]
    lists = tmp_path / "lists"
    lists.mkdir()
    for k, f in enumerate(chosen):
        shutil.copy(f, lists / f"g{k}{f.suffix}")
    pd.DataFrame({"path": [f"g{k}{f.suffix}" for k, f in enumerate(chosen)][::-1],
                  "id": ["c", "b", "a"]}).to_csv(lists / "list.csv", index=False)
    pd.DataFrame({"file_loc": [f"g{k}{f.suffix}" for k, f in enumerate(chosen)]}).to_parquet(
        lists / "list.parquet")
    cutouts = tmp_path / "cutouts"
    cutouts.mkdir()
    grey = np.asarray(Image.open(chosen[0]).convert("L"), dtype=np.float32)
    fits.PrimaryHDU(grey[::-1]).writeto(cutouts / "one.fits.gz")  # FITS rows run bottom-up
    out = tmp_path / "cat"
    assert run("--model", model, "--images", lists / "list.csv", lists / "list.parquet",
               cutouts, "--out", out, "--caption", "both", *FAST) == 0
    rows = read(out)
    expected = [str(lists / f"g{k}{f.suffix}") for k, f in enumerate(chosen)]
    assert rows["image"].tolist() == expected[::-1] + expected + [str(cutouts / "one.fits.gz")]
    assert rows["id"].tolist() == ["c", "b", "a", "g0", "g1", "g2", "one"]
    described = describe_paths(model, expected[::-1] + expected + [cutouts / "one.fits.gz"],
                               batch_size=2, num_beams=2, max_new_tokens=8)
    assert rows["caption"].tolist() == [d["caption"] for d in described]


def test_a_lost_part_is_rewritten_and_leftovers_removed(model, images, reference, tmp_path):
    out = tmp_path / "cat"
    shutil.copytree(reference, out)
    kept = (out / part_name(0)).stat().st_mtime_ns
    (out / part_name(1)).unlink()  # what a kill during part 1 leaves: part 0, 2 and a temp
    (out / f".{part_name(1)}.abcd1234.tmp").mkdir()
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4, *FAST) == 0
    pd.testing.assert_frame_equal(read(out), read(reference))
    assert (out / part_name(0)).stat().st_mtime_ns == kept  # finished parts are not redone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_killed_then_rerun_equals_an_uninterrupted_run(model, prepared_dir, tmp_path):
    argv = ["--model", model, "--images", prepared_dir / "images", "--part-size", 2,
            "--no-scores", *FAST]
    whole = tmp_path / "whole"
    assert run(*argv, "--out", whole) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "galaxy_llava", "catalogue", *map(str, argv),
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / part_name(0)).exists():
        assert proc.poll() is None and time.time() < deadline, "no part appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(out.glob("part-*.parquet"))) < len(list(whole.glob("part-*.parquet")))
    assert run(*argv, "--out", out) == 0
    pd.testing.assert_frame_equal(read(out), read(whole))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_other_settings_into_the_same_out_are_refused(model, images, reference, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in reference.iterdir())
    assert run("--model", model, "--images", images, "--out", reference, "--part-size", 4,
               "--batch-size", "2", "--num-beams", "3", "--max-new-tokens", "8") == 2
    err = capsys.readouterr().err.strip()
    assert "different catalogue" in err and "num_beams 2 -> 3" in err and "\n" not in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in reference.iterdir()) == before


@pytest.mark.parametrize("args, message", [
    (["--images", "{missing}"], "not found"),
    (["--images", "{images}", "--shard", "3/2"], "--shard 3/2"),
    (["--images", "{images}", "--part-size", "0"], "--part-size must be >= 1"),
    (["--images", "{images}", "--shard", "x"], "--shard must be I/N"),
    (["--images", "{images}/notes.txt"], "not a folder, an image or a .csv/.parquet list"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(model, images, tmp_path, capsys,
                                                         args, message):
    out = tmp_path / "cat"
    args = [a.format(missing=tmp_path / "nope", images=images) for a in args]
    assert run("--model", model, "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("galaxy-llava catalogue: error")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- survey inputs

def _survey(prepared_dir, folder: Path) -> Path:
    """Good files beside a table-only FITS, a zero-size FITS (astropy's real test files), a
    truncated JPEG, a 16-bit PNG (readable) and an empty file."""
    import astropy
    import numpy as np
    from PIL import Image

    folder.mkdir()
    good = sorted((prepared_dir / "images").iterdir())[:3]
    for f in good:
        shutil.copy(f, folder / f.name)
    data = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"
    shutil.copy(data / "table.fits", folder / "c-table.fits")
    shutil.copy(data / "zerowidth.fits", folder / "d-zero.fits")
    whole = good[0].read_bytes()
    (folder / "e-cut.jpg").write_bytes(whole[:whole.index(b"\xff\xda") + 40])  # scan cut
    grey = np.asarray(Image.open(good[1]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(folder / "f-deep.png")
    (folder / "g-empty.png").write_bytes(b"")
    return folder


BAD = {"c-table.fits": "no image HDU", "d-zero.fits": "zero-size image",
       "e-cut.jpg": "cannot read the image", "g-empty.png": "an empty file"}


def test_unreadable_files_are_skipped_and_recorded_and_the_exit_code_says_so(
        model, prepared_dir, tmp_path, capsys):
    """One bad file stopped the whole catalogue; now each is skipped, listed with its reason in
    OUT/_failures.csv, counted at the end, and the exit code is 3 (again on a re-run)."""
    import pyarrow.dataset

    folder = _survey(prepared_dir, tmp_path / "survey")
    out = tmp_path / "cat"
    argv = ["--model", model, "--images", folder, "--out", out, "--part-size", 2, *FAST]
    assert run(*argv) == 3
    printed = capsys.readouterr().out
    assert "skipped 4 input(s) that could not be read" in printed and "_failures.csv" in printed
    failures = pd.read_csv(out / "_failures.csv")
    assert sorted(Path(p).name for p in failures["image"]) == sorted(BAD)
    for _, f in failures.iterrows():
        assert BAD[Path(f["image"]).name] in f["reason"]
    # Read as a dataset folder: the manifest and the failures table are skipped by both readers.
    rows = pd.read_parquet(out)
    assert len(pyarrow.dataset.dataset(out).to_table()) == len(rows) == 4
    assert sorted(Path(p).name for p in rows["image"]) == sorted(
        [p.name for p in folder.iterdir() if p.name not in BAD])
    assert rows["bar"].dtype == bool and rows["disturbed"].dtype == bool
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert run(*argv) == 3  # a re-run: the same skipped files, the same count, nothing redone
    assert "skipped 4 input(s)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == kept
    pd.testing.assert_frame_equal(pd.read_csv(out / "_failures.csv"), failures)
    # --strict stops at the first, before any model loads, in one line
    assert run(*argv[:-2 - len(FAST)], "--out", tmp_path / "strict", *FAST, "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert "c-table.fits: no image HDU" in err and "\n" not in err


def test_describe_skips_bad_files_on_stderr_and_describes_the_rest(model, prepared_dir,
                                                                    tmp_path, capsys):
    folder = _survey(prepared_dir, tmp_path / "survey")
    assert main(["describe", "--model", str(model), str(folder), "--num-beams", "1",
                 "--max-new-tokens", "4"]) == 3
    captured = capsys.readouterr()
    skipped = captured.err.strip().splitlines()
    assert len(skipped) == 4 and all(s.startswith("galaxy-llava describe: skipped: ")
                                     for s in skipped)
    assert sorted(Path(s.split()[3].rstrip(":")).name for s in skipped) == sorted(BAD)
    assert all(s.count(s.split()[3].rstrip(":")) == 1 for s in skipped), skipped  # named once
    described = [line.split("\t")[0] for line in captured.out.strip().splitlines()]
    assert sorted(Path(d).name for d in described) == sorted(
        p.name for p in folder.iterdir() if p.name not in BAD)


def test_the_users_columns_come_through(model, images, synth_dir, tmp_path, capsys):
    """A path list's ra, dec and other columns, and a --source catalogue's ra, dec and
    dataset_name (dropped before), are in the catalogue's rows and in describe --json."""
    import json

    import pyarrow.parquet as pq

    files = sorted(images.rglob("*.png")) + sorted(images.rglob("*.jpg"))
    listed = tmp_path / "list"
    listed.mkdir()
    for f in files[:2]:
        shutil.copy(f, listed / f.name)
    pd.DataFrame({"path": [f.name for f in files[:2]], "ra": [150.25, 150.5],
                  "dec": [2.25, -2.5], "type": ["S0", "E"]}).to_csv(listed / "l.csv",
                                                                     index=False)
    out = tmp_path / "cat"
    assert run("--model", model, "--images", listed / "l.csv", "--out", out, *FAST,
               "--caption", "both") == 0  # beam captions, as describe gives them
    rows = pd.read_parquet(out)
    assert rows["ra"].tolist() == [150.25, 150.5] and rows["dec"].tolist() == [2.25, -2.5]
    assert rows["input_type"].tolist() == ["S0", "E"]  # a clash with our own `type`, renamed
    capsys.readouterr()
    assert main(["describe", "--model", str(model), str(listed / "l.csv"), "--json",
                 "--num-beams", "2", "--max-new-tokens", "8"]) == 0
    described = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(d["ra"], d["dec"], d["type"]) for d in described] == [
        (150.25, 2.25, "S0"), (150.5, -2.5, "E")]
    assert [d["caption"] for d in described] == rows["caption"].tolist()

    shard = sorted((synth_dir / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard).slice(0, 3).to_pandas()
    table["ra"], table["dec"], table["dataset_name"] = [1.0, 2.0, 3.0], [-1.0, 0.0, 1.0], "gz2"
    table.to_parquet(tmp_path / "source.parquet")
    out = tmp_path / "cat-source"
    assert run("--model", model, "--source", tmp_path / "source.parquet", "--out", out,
               *FAST) == 0
    rows = pd.read_parquet(out)
    assert rows["ra"].tolist() == [1.0, 2.0, 3.0] and rows["dec"].tolist() == [-1.0, 0.0, 1.0]
    assert rows["dataset_name"].tolist() == ["gz2"] * 3
    assert rows["id"].tolist() == table["id_str"].astype(str).tolist()


def test_a_catalogue_with_the_old_manifest_name_is_continued(model, images, reference,
                                                             tmp_path):
    """Folders written before `_manifest.json` hold `manifest.json`: recognised (not "a folder
    of other files"), continued without redoing a part, and renamed by the run."""
    out = tmp_path / "cat"
    shutil.copytree(reference, out)
    (out / MANIFEST).rename(out / "manifest.json")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert run("--model", model, "--images", images, "--out", out, "--part-size", 4, *FAST) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == kept
    assert (out / MANIFEST).is_file() and not (out / "manifest.json").exists()
