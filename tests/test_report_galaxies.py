"""The report's grid of galaxies: each answer's phrases marked right, wrong or left out, read
as the metrics read them."""

from __future__ import annotations

import json

import pytest

from galaxy_llava.errors import UserError
from galaxy_llava.metrics import read_answer
from galaxy_llava.morphology import Morphology
from galaxy_llava.report_galaxies import _image_path, check_row, image_roots, marked_answer


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


def test_a_dataset_named_by_its_jsonl_gives_the_same_folder(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "dataset.jsonl").write_text("")
    ev = tmp_path / "eval"
    for data in (tmp_path / "data", tmp_path / "data" / "dataset.jsonl"):
        roots = image_roots({"folder": ev, "metrics": {"data": str(data)}})
        assert roots == [ev.resolve(), (tmp_path / "data").resolve()]
        assert _image_path("images/0.png", str(data)) == tmp_path / "data" / "images" / "0.png"
    assert image_roots({"folder": ev, "metrics": {"data": str(tmp_path)}}) == [ev.resolve()]


def test_an_older_eval_folders_data_typed_relative_is_found_from_any_folder(tmp_path,
                                                                            monkeypatch):
    """EVAL folders written before metrics.json stored ``data`` absolute: the report takes the
    absolute path their ``inputs`` recorded, so its images embed from another folder too."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.jsonl").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ev = tmp_path / "eval"
    metrics = {"data": "data", "inputs": {"data": str(tmp_path / "data")}}
    assert image_roots({"folder": ev, "metrics": metrics}) == [ev.resolve(),
                                                                (tmp_path / "data").resolve()]
    assert image_roots({"folder": ev, "metrics": {"data": "data", "inputs": [1]}}) == [
        ev.resolve()]


def test_check_row_takes_what_evaluate_writes_and_names_a_bad_one():
    good = {"id_str": "J1", "truth": "x", "prediction": None, "grammar": {"best": "y"},
            "truth_attributes": Morphology("spiral", bar=True).to_dict()}
    check_row(json.loads(json.dumps(good)), "p line 1")
    for bad in ({"truth_attributes": {**good["truth_attributes"], "arms": "7"}},
                {"truth_attributes": {"type": "spiral", "size": 3}}, {"grammar": {"best": 1}}):
        with pytest.raises(UserError, match=r"^p line 4: ") as e:
            check_row({**good, **bad}, "p line 4")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="must be a JSON object"):
        check_row([1], "p line 5")
