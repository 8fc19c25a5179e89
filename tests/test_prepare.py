"""prepare: balanced seeded selection, captions equal to the notebook's rules, splits, images,
re-runs, and every kind of bad input. Catalogues are built here (see test_gz2_catalog's builders)."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from galaxy_llava.cli import main
from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import col
from galaxy_llava.prepare import prepare, select
from galaxy_llava.calibration import vote_record_columns
from galaxy_llava.rules import REFERENCE_COLUMNS, caption_from_fractions, morphology_from_fractions
from notebook_oracle import notebook_describe
from test_gz2_catalog import (draw_galaxy, images_for, make_votes, write_csv, write_disk,
                          write_hub_parquet)

SMOOTH = col("smooth-or-featured", "smooth")
RECORD_KEYS = ["image", "text", "id_str", "split", "morphology", "fractions", "votes"]


def read_jsonl(folder):
    return [json.loads(line) for line in (folder / "dataset.jsonl").read_text().splitlines()]


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(src, out, **kw):
    args = dict(n_per_class=10, seed=0, image_size=32, val_fraction=0.2, test_fraction=0.2,
                workers=2)
    return prepare(src, out, **{**args, **kw})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """40 galaxies (22 elliptical; 18 spiral, one at exactly 0.6) in the Hub parquet layout."""
    df = make_votes(40, seed=7, n_elliptical=22)
    folder = write_hub_parquet(df, images_for(df), tmp_path_factory.mktemp("src"), shards=2)
    return folder, df


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    return out, run(source[0], out)


# ---------------------------------------------------------------- the dataset

def test_balanced_records_images_and_splits(prepared, source):
    out, stats = prepared
    df = source[1].set_index("id_str")
    recs = read_jsonl(out)
    assert len(recs) == 20 and all(list(r) == RECORD_KEYS for r in recs)
    ids = [r["id_str"] for r in recs]
    assert len(set(ids)) == 20
    classes = {i: "elliptical" if df.loc[i, SMOOTH] > 0.6 else "spiral" for i in ids}
    for c in ("elliptical", "spiral"):
        mine = [r for r in recs if classes[r["id_str"]] == c]
        assert len(mine) == 10
        # stratified: round(10 * 0.2) test and validation per class
        assert sorted(r["split"] for r in mine) == (["test"] * 2 + ["train"] * 6
                                                    + ["validation"] * 2)
    for r in recs:
        assert r["image"] == f"images/{hashlib.md5(r['id_str'].encode()).hexdigest()}.jpg"
        with Image.open(out / r["image"]) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    assert len(list((out / "images").iterdir())) == 20
    assert stats["classes"] == {"elliptical": 10, "spiral": 10}
    assert stats["splits"]["test"] == {"elliptical": 2, "spiral": 2, "total": 4}
    assert stats["available"] == {"elliptical": 22, "spiral": 18}  # the 0.6 row is a spiral
    assert stats["images_written"] == 20 and stats["skipped_images"] == []
    assert json.loads((out / "stats.json").read_text())["n_records"] == 20
    lengths = sorted(len(r["text"]) for r in recs)
    assert len(stats["captions"]["shortest"]) == lengths[0]
    assert len(stats["captions"]["longest"]) == lengths[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["n_per_class"], manifest["seed"], manifest["catalog_rows"]) == (10, 0, 40)
    assert (out / "preview.png").read_bytes()[:4] == b"\x89PNG"


def test_captions_equal_reference_rules_on_source_rows(prepared, source):
    out, _ = prepared
    df = source[1].set_index("id_str")
    recs = read_jsonl(out)
    saw_null = False
    for r in recs:
        row = df.loc[r["id_str"]]
        assert r["text"] == notebook_describe(row) == caption_from_fractions(row)
        assert r["morphology"] == morphology_from_fractions(row).to_dict()
        # the rules' fractions first, then what every rule set's vote MSE needs
        assert list(r["fractions"])[:len(REFERENCE_COLUMNS)] == list(REFERENCE_COLUMNS)
        assert list(r["fractions"]) + list(r["votes"]) == list(dict.fromkeys(
            (*REFERENCE_COLUMNS, *vote_record_columns())))
        for c, v in {**r["fractions"], **r["votes"]}.items():
            assert (v is None and math.isnan(row[c])) or v == row[c]
            saw_null |= v is None
    assert saw_null, "the fixture should exercise unanswered (NaN) questions"
    assert len({r["text"] for r in recs}) > 5


def test_notebook_describe_agrees_on_rows_with_nan():
    df = make_votes(300, seed=11)
    # every reference column also NaN / exactly on a threshold somewhere
    for k, c in enumerate(REFERENCE_COLUMNS):
        df.loc[k, c] = np.nan
        df.loc[k + 20, c] = 0.5
        df.loc[k + 40, c] = 0.6
        df.loc[k + 60, c] = 0.4
    assert df[list(REFERENCE_COLUMNS)].isna().any(axis=1).sum() > 100
    captions = set()
    for _, row in df.iterrows():
        assert caption_from_fractions(row) == notebook_describe(row)
        captions.add(notebook_describe(row))
    assert len(captions) > 30


def test_jsonl_loads_with_datasets(prepared, tmp_path):
    import datasets

    out, _ = prepared
    ds = datasets.load_dataset("json", data_files=str(out / "dataset.jsonl"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 20 and ds.column_names == RECORD_KEYS
    m = ds.features["morphology"]
    assert m["shape"].dtype == "string" and m["arms"].dtype == "string"
    assert m["bar"].dtype == "bool" and ds.features["fractions"][SMOOTH].dtype == "float64"
    assert ds[0]["text"] == read_jsonl(out)[0]["text"]


def test_rerun_changes_nothing_and_workers_do_not_matter(prepared, source, tmp_path, capsys):
    out, _ = prepared
    before = snapshot(out)
    stats = run(source[0], out, workers=1)
    assert snapshot(out) == before  # bytes and mtimes
    assert stats["images_written"] == 0 and stats["images_reused"] == 20
    assert "20 already present" in capsys.readouterr().out
    # a fresh folder, one worker: the same bytes
    other = tmp_path / "again"
    run(source[0], other, workers=1)
    again = snapshot(other)
    assert {k: v[0] for k, v in again.items() if k != "manifest.json"} == \
        {k: v[0] for k, v in before.items() if k != "manifest.json"}


def test_interrupted_run_resumes(source, tmp_path):
    out = tmp_path / "out"
    run(source[0], out)
    victim = sorted((out / "images").iterdir())[3]
    victim.unlink()
    (out / "dataset.jsonl").unlink()
    stats = run(source[0], out)
    assert stats["images_written"] == 1 and victim.exists() and len(read_jsonl(out)) == 20


def test_seed_and_size_change_the_selection(source, tmp_path):
    a = {r["id_str"] for r in read_jsonl(_prep(source, tmp_path / "a", seed=1))}
    b = {r["id_str"] for r in read_jsonl(_prep(source, tmp_path / "b", seed=2))}
    assert a != b
    c = {r["id_str"] for r in read_jsonl(_prep(source, tmp_path / "c", seed=1, n_per_class=14))}
    assert a < c  # a larger N extends the same seeded selection


def _prep(source, out, **kw):
    run(source[0], out, **kw)
    return out


def test_select_is_vectorised_and_stratified():
    votes = make_votes(400, seed=5, n_elliptical=300)
    sel = select(votes, 50, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert len(sel) == 100 and sel["row"].is_unique
    smooth = votes.loc[sel["row"], SMOOTH].to_numpy()
    assert ((smooth > 0.6) == (sel["class"] == "elliptical").to_numpy()).all()
    counts = sel.groupby(["class", "split"]).size().unstack()
    assert counts.loc["elliptical"].to_dict() == {"test": 10, "train": 35, "validation": 5}
    assert counts.loc["spiral"].to_dict() == counts.loc["elliptical"].to_dict()
    # interleaved, not one class after the other
    assert sel["class"].iloc[:50].nunique() == 2
    pd.testing.assert_frame_equal(sel, select(votes, 50, seed=3, val_fraction=0.1,
                                              test_fraction=0.2))


@pytest.mark.parametrize("kind", ["csv", "disk"])
def test_csv_and_save_to_disk_give_the_same_dataset(prepared, source, tmp_path, kind):
    df = source[1]
    if kind == "csv":
        src = write_csv(df, images_for(df), tmp_path / "csv")
    else:
        src = write_disk(df, images_for(df), tmp_path / "disk")
    out = tmp_path / "out"
    run(src, out)
    assert (out / "dataset.jsonl").read_bytes() == (prepared[0] / "dataset.jsonl").read_bytes()


def test_tree_rules(source, tmp_path):
    out = tmp_path / "out"
    run(source[0], out, rules="tree", min_votes=3)
    df = source[1].set_index("id_str")
    recs = read_jsonl(out)
    assert all(r["text"] == caption_from_fractions(df.loc[r["id_str"]], "tree", 3)
               for r in recs)
    assert all(c.endswith("_fraction") for c in recs[0]["fractions"])
    assert set(recs[0]["fractions"]) >= {col("disk-edge-on", "yes")}


def test_tree_rules_summaries_count_the_true_types(source, tmp_path, capsys):
    """Under the tree rules a galaxy selected as "spiral" (smooth fraction <= 0.6) may be an
    edge-on disk or an artifact, and one selected as elliptical may lack the votes to be one:
    the counts and the printed summary say the types the captions say."""
    out = tmp_path / "out"
    stats = run(source[0], out, rules="tree", min_votes=3)
    recs = read_jsonl(out)
    types = Counter(r["morphology"]["type"] for r in recs)
    assert set(types) - {"elliptical", "spiral"}, "the fixture should draw other types"
    assert {t: n for t, n in stats["classes"].items() if n} == types
    assert list(stats["classes"]) == ["elliptical", "spiral", "edge-on disk", "artifact"]
    for split in ("train", "validation", "test"):
        want = Counter(r["morphology"]["type"] for r in recs if r["split"] == split)
        got = stats["splits"][split]
        assert {t: n for t, n in got.items() if n and t != "total"} == want
        assert got["total"] == sum(want.values())
    assert stats["selection"] == {"elliptical": 10, "spiral": 10}  # what the balance is about
    assert json.loads((out / "stats.json").read_text())["classes"] == stats["classes"]
    printed = capsys.readouterr().out
    assert "records: 20  " + "  ".join(f"{t}: {n}" for t, n in stats["classes"].items()) \
        in printed
    assert "balanced selection: 10 with smooth fraction > 0.6, 10 without" in printed


def test_reference_summaries_keep_two_types(prepared):
    _, stats = prepared
    assert stats["classes"] == stats["selection"] == {"elliptical": 10, "spiral": 10}


def test_same_dataset_from_another_copy_of_the_catalogue_writes_the_same_bytes(
        prepared, source, tmp_path):
    """The stats and the dataset card describe the manifest the first run recorded, so the same
    catalogue read from elsewhere, in another format, changes no byte."""
    import shutil

    out = tmp_path / "data"
    shutil.copytree(prepared[0], out)
    before = snapshot(out)
    df = source[1]
    stats = run(write_csv(df, images_for(df), tmp_path / "csv"), out)
    assert stats["images_written"] == 0
    assert snapshot(out) == before  # README.md and stats.json included, mtimes too
    assert "a parquet catalogue" in (out / "README.md").read_text()


def test_non_square_images_are_padded_not_stretched(tmp_path):
    df = make_votes(4, seed=2, n_elliptical=2)
    imgs = [draw_galaxy(i, shape=(60, 30)) for i in range(4)]
    out = tmp_path / "out"
    run(write_hub_parquet(df, imgs, tmp_path / "src"), out, n_per_class=2)
    rec = read_jsonl(out)[0]
    arr = np.asarray(Image.open(out / rec["image"]).convert("L"), dtype=float)
    assert arr.shape == (32, 32)
    assert arr[:6].max() < 40 and arr[-6:].max() < 40  # black bands above and below


# ---------------------------------------------------------------- bad input

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_unreadable_truncated_and_bomb_images_are_skipped(tmp_path, capsys, monkeypatch):
    df = make_votes(40, seed=7, n_elliptical=22)
    imgs = images_for(df)
    bad = {}
    for i in range(0, 40, 3):
        kind = ("garbage", "truncated", "bomb")[(i // 3) % 3]
        bad[df.id_str[i]] = kind
        imgs[i] = {"garbage": b"not a jpeg at all", "truncated": imgs[i][:200],
                   "bomb": draw_galaxy(i, size=64)}[kind]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 48x48 passes, 64x64 is a "bomb"
    out = tmp_path / "out"
    stats = run(write_hub_parquet(df, imgs, tmp_path / "src"), out)
    err = capsys.readouterr().err
    chosen = {r["id_str"] for r in read_jsonl(out)}
    skipped = {s["id_str"]: s["reason"] for s in stats["skipped_images"]}
    assert set(skipped) and set(skipped) <= set(bad) and not chosen & set(bad)
    assert len(chosen) + len(skipped) == 20
    for i, reason in skipped.items():
        assert f"galaxy {i}:" in err
        assert ("decompression bomb" if bad[i] == "bomb" else "unreadable") in reason
        assert not (out / "images" / f"{hashlib.md5(i.encode()).hexdigest()}.jpg").exists()
    assert "Traceback" not in err
    assert json.loads((out / "stats.json").read_text())["skipped_images"] == stats["skipped_images"]
    assert sum(stats["classes"].values()) == len(chosen)


def test_all_images_unreadable(tmp_path):
    df = make_votes(10, seed=1)
    src = write_hub_parquet(df, [b"junk"] * 10, tmp_path / "src")
    with pytest.raises(UserError, match="none of the .* selected images could be read"):
        run(src, tmp_path / "out", n_per_class=2)


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_wrong_type_columns(source, tmp_path):
    df = source[1]
    gone = col("something-odd", "yes")
    with pytest.raises(UserError, match=f"missing column.*{gone}"):
        run(write_hub_parquet(df.drop(columns=[gone]), images_for(df), tmp_path / "a"),
            tmp_path / "out")
    bad = df.assign(**{SMOOTH: df[SMOOTH].astype(str)})
    with pytest.raises(UserError, match=f"non-numeric column.*{SMOOTH}"):
        run(write_hub_parquet(bad, images_for(df), tmp_path / "b"), tmp_path / "out")


def test_empty_selection(tmp_path):
    df = make_votes(12, seed=4, n_elliptical=11)
    df.loc[0, SMOOTH] = 0.9  # make_votes puts row 0 at exactly 0.6
    with pytest.raises(UserError, match="empty selection.*12 elliptical.*0 spiral"):
        run(write_hub_parquet(df, images_for(df), tmp_path / "src"), tmp_path / "out")


def test_capped_selection_prints_a_note(source, tmp_path, capsys):
    stats = run(source[0], tmp_path / "out", n_per_class=100)
    assert stats["n_per_class"] == 18 and stats["classes"] == {"elliptical": 18, "spiral": 18}
    assert "only 18 spiral galaxies" in stats["capped_note"]
    assert stats["capped_note"] in capsys.readouterr().out


@pytest.mark.parametrize("kw, match", [
    ({"n_per_class": 0}, "--n-per-class must be at least 1"),
    ({"n_per_class": -5}, "--n-per-class"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
    ({"test_fraction": -0.1}, "--test-fraction"),
    ({"image_size": 0}, "--image-size"),
    ({"seed": -1}, "--seed"),
    ({"rules": "mine"}, "unknown rule set 'mine'; known rule sets: reference, tree"),
    ({"workers": 0}, "--workers"),
])
def test_bad_arguments(source, tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        run(source[0], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_output_folder_with_a_different_dataset_is_refused(prepared, source, tmp_path):
    out, _ = prepared
    before = snapshot(out)
    with pytest.raises(UserError, match="different dataset: seed 0 -> 1"):
        run(source[0], out, seed=1)
    with pytest.raises(UserError, match="image_size 32 -> 64"):
        run(source[0], out, image_size=64)
    df = source[1].copy()
    df.loc[5, SMOOTH] = 0.99
    other = write_hub_parquet(df, images_for(df), tmp_path / "other")
    with pytest.raises(UserError, match="catalogue content differs"):
        run(other, out)
    assert snapshot(out) == before


def test_same_catalogue_elsewhere_is_the_same_dataset(prepared, source, tmp_path):
    df = source[1]
    copy = write_hub_parquet(df, images_for(df), tmp_path / "copy", shards=3)
    assert run(copy, prepared[0])["images_written"] == 0


def test_foreign_output_folder_is_refused(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no manifest.json"):
        run(source[0], out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run(source[0], tmp_path / "file")


def test_duplicate_and_missing_ids_are_left_out(tmp_path, capsys):
    df = make_votes(30, seed=9)
    df.loc[3, "id_str"] = df.loc[2, "id_str"]
    df.loc[4, "id_str"] = None
    stats = run(write_hub_parquet(df, images_for(df), tmp_path / "src"), tmp_path / "out",
                n_per_class=13)
    assert stats["excluded_rows"] == {"missing_id": 1, "duplicate_id": 1}
    assert sum(stats["available"].values()) == 28
    assert "repeated id_str" in capsys.readouterr().err


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    rc = main(["prepare", "--source", str(tmp_path / "missing.parquet"), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not found" in err and "Traceback" not in err
    rc = main(["prepare", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
               "--n-per-class", "0"])
    assert rc == 2 and "--n-per-class" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end (synthetic)

@pytest.mark.slow
def test_synthetic_end_to_end(tmp_path):
    synthetic = pytest.importorskip("galaxy_llava.toy.synthetic")
    if not hasattr(synthetic, "synthesize"):
        pytest.skip("synthetic.synthesize is not written yet")
    assert main(["synth", "--out", str(tmp_path / "synth"), "--n", "300", "--seed", "1"]) == 0
    out = tmp_path / "prep"
    args = ["prepare", "--source", str(tmp_path / "synth"), "--out", str(out),
            "--n-per-class", "60"]
    assert main(args) == 0
    recs = read_jsonl(out)
    assert len(recs) == 120
    shards = sorted((tmp_path / "synth").rglob("*.parquet"))
    source = pd.concat([pd.read_parquet(p) for p in shards])
    source = source.drop(columns=["image"]).set_index("id_str")
    counts = {"elliptical": 0, "spiral": 0}
    for r in recs:
        row = source.loc[r["id_str"]]
        counts["elliptical" if row[SMOOTH] > 0.6 else "spiral"] += 1
        assert r["text"] == notebook_describe(row)
        with Image.open(out / r["image"]) as img:
            assert (img.format, img.size, img.mode) == ("JPEG", (336, 336), "RGB")
    assert counts == {"elliptical": 60, "spiral": 60}
    before = snapshot(out)
    assert main(args) == 0
    assert snapshot(out) == before


def test_galaxy_datasets_layout_through_the_cli_with_images_root(tmp_path):
    """galaxy-datasets' gz2 catalogue (subfolder + filename, images kept elsewhere) prepares
    with --images-root; the records keep each question's total votes and the bulge-size
    dominant fraction whatever the rule set."""
    from test_gz2_catalog import _galaxy_datasets_layout, counted_votes

    df = counted_votes(30, seed=6)
    path = _galaxy_datasets_layout(tmp_path / "gz2", df)
    (tmp_path / "gz2" / "images").rename(tmp_path / "pictures")
    for rules in ("reference", "tree"):
        out = tmp_path / rules
        assert main(["prepare", "--source", str(path), "--out", str(out), "--n-per-class", "3",
                     "--image-size", "16", "--rules", rules,
                     "--images-root", str(tmp_path / "pictures")]) == 0
        recs = read_jsonl(out)
        assert len(recs) == 6
        byid = df.set_index("id_str")
        for r in recs:
            assert r["votes"]["bar-gz2_total-votes"] == byid.loc[r["id_str"], "bar-gz2_total-votes"]
            assert col("bulge-size", "dominant") in r["fractions"]
