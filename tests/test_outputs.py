"""The output contract's shared code: telling outputs apart, refusing what is not ours, staging a
folder and swapping it in, and cleaning what crashed writes left (io.atomic_path / recover)."""

from __future__ import annotations

import json
import os

import pytest

from galaxy_llava import outputs
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, recover, write_text


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _make(folder, *files, text="x"):
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_text(text)
    return folder


@pytest.mark.parametrize("files, kind", [
    ((), "empty"),
    (("manifest.json", "images/a.jpg"), "dataset"),
    (("dataset.jsonl",), "dataset"),
    (("config.json", "model.safetensors"), "model"),
    (("config.yaml",), "run"),
    (("checkpoint-3/trainer_state.json",), "run"),
    (("model/config.json", "galaxy_llava.json"), "run"),
    (("metrics.json", "predictions.jsonl"), "eval"),
    (("synth.json", "data/train-0.parquet"), "catalogue"),
    (("notes.txt",), "folder"),
    ((".notes.abcd1234.tmp",), "empty"),  # only a crashed write's leftover
])
def test_kind_of_folders(tmp_path, files, kind):
    assert outputs.kind_of(_make(tmp_path / "out", *files)) == kind


def test_kind_of_files(tmp_path):
    assert outputs.kind_of(tmp_path / "nothing") is None
    (tmp_path / "r.html").write_text("<html><head><title>galaxy-llava report</title>")
    (tmp_path / "x.html").write_text("<html><title>my page</title>")
    assert outputs.kind_of(tmp_path / "r.html") == "report"
    assert outputs.kind_of(tmp_path / "x.html") == "file"


def test_claim_new_same_different_and_overwrite(tmp_path):
    out = tmp_path / "a" / "b"
    assert outputs.claim(out, "dataset", identity={"seed": 1}) == "new"
    assert not out.exists() and not out.parent.exists()  # a check changes nothing
    _make(out, "images/x.jpg")
    (out / "manifest.json").write_text(json.dumps({"seed": 1, "n": 3}))
    assert outputs.claim(out, "dataset", identity={"seed": 1}) == "same"
    with pytest.raises(UserError, match=r"holds a different dataset: seed 1 -> 2; pass "
                                        r"--overwrite"):
        outputs.claim(out, "dataset", identity={"seed": 2})
    assert outputs.claim(out, "dataset", identity={"seed": 2}, overwrite=True) == "replace"
    assert outputs.claim(out, "dataset", identity=lambda o: []) == "same"
    with pytest.raises(UserError, match="made by another command"):
        outputs.claim(out, "dataset")  # no identity to compare: only --overwrite replaces


@pytest.mark.parametrize("files, kind, message", [
    (("manifest.json",), "model", "holds a prepared dataset, not a model folder; refusing to "
                                  "replace it \\(even with --overwrite\\)"),
    (("config.json",), "dataset", "holds a model folder, not a prepared dataset"),
    (("metrics.json",), "report", "is a folder; a report is one file"),
    (("notes.txt",), "eval", "holds no metrics.json from `galaxy-llava evaluate or probe`"),
])
def test_claim_refuses_another_kind_even_with_overwrite(tmp_path, files, kind, message):
    out = _make(tmp_path / "out", *files)
    before = _tree(tmp_path)
    with pytest.raises(UserError, match=message):
        outputs.claim(out, kind, overwrite=True, identity={"x": 1})
    assert _tree(tmp_path) == before


def test_claim_refuses_files_where_folders_go_and_the_reverse(tmp_path):
    (tmp_path / "f.txt").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        outputs.claim(tmp_path / "f.txt", "eval", overwrite=True)
    with pytest.raises(UserError, match="f.txt is a file, not a folder"):
        outputs.claim(tmp_path / "f.txt" / "sub", "eval")
    with pytest.raises(UserError, match="holds a file, not an HTML report"):
        outputs.claim(tmp_path / "f.txt", "report", overwrite=True, identity={"evals": []})
    report = tmp_path / "r.html"
    report.write_text("<head><title>galaxy-llava report</title>"
                      + outputs.report_meta({"evals": ["/a"]}))
    assert outputs.identity_of(report, "report") == {"evals": ["/a"]}
    assert outputs.claim(report, "report", identity={"evals": ["/a"]}) == "same"
    with pytest.raises(UserError, match="holds a different report"):
        outputs.claim(report, "report", identity={"evals": ["/b"]})


def test_staged_folder_swaps_in_whole_or_leaves_everything_as_it_was(tmp_path):
    out = _make(tmp_path / "out", "keep.txt", "sub/old.txt", text="old")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError):
        with outputs.staged_folder(out, keep=True) as stage:
            write_text(stage / "new.txt", "new")
            raise RuntimeError("disk on fire")
    assert _tree(tmp_path) == before
    inode = (out / "keep.txt").stat().st_ino
    with outputs.staged_folder(out, keep=True) as stage:
        write_text(stage / "sub" / "old.txt", "replaced")  # by rename: the old bytes survive
        assert (out / "sub" / "old.txt").read_text() == "old"
    assert (out / "keep.txt").stat().st_ino == inode  # reused by a hard link, not copied
    assert (out / "sub" / "old.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with outputs.staged_folder(out) as stage:  # not kept: the new folder only
        (stage / "only.txt").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["only.txt"]


def test_a_failed_write_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a" / "b" / "c.txt") as tmp:
            tmp.write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_leftovers_are_removed_and_a_half_swapped_folder_comes_back(tmp_path):
    out = _make(tmp_path / "eval", "metrics.json", "images/.a.jpg.k2j4h5g6.tmp/a.jpg",
                ".predictions.jsonl.zzzzzzzz.tmp")
    _make(tmp_path / ".eval.abcdefgh.tmp", "eval/metrics.json")
    _make(tmp_path / ".evaluation.abcdefgh.tmp")  # another output's: not ours to remove
    (tmp_path / "evaluation").mkdir()
    assert outputs.clean_leftovers(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".evaluation.abcdefgh.tmp", "eval",
                                                          "evaluation"]
    assert _tree(out) == {"images": None, "metrics.json": b"x"}
    # A crash between the two renames of a folder swap: the old folder is put back.
    os.replace(out, tmp_path / ".eval.old")
    recover(out)
    assert _tree(out) == {"images": None, "metrics.json": b"x"}
    assert outputs.kind_of(out) == "eval"
