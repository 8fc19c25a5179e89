"""records: JSONL records of a prepared dataset (paths, splits, one-line errors) and guarded image
loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.imagefiles import IMAGE_SUFFIXES
from galaxy_llava.records import load_image, load_records

SHORTEST = "This is an image of a spiral galaxy."
LONGEST = ("This is an image of an elliptical galaxy, moderately elongated in shape, "
           "prominent bulge at its center, boxy bulge at its center, "
           "disturbed or merging with another galaxy.")


def _image(seed: int = 0, size: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 9, 3), dtype=np.uint8))


def _write_dataset(folder, lines):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        _image().save(folder / "images" / f"{name}.jpg")
    (folder / "dataset.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_load_records_resolves_paths_and_splits(tmp_path):
    recs = [{"image": "images/a.jpg", "text": SHORTEST, "split": "train"},
            {"image": "images/b.jpg", "text": LONGEST, "split": "val"},
            {"image": "images/c.jpg", "text": SHORTEST, "split": "train"}]
    _write_dataset(tmp_path, recs)
    all_records = load_records(tmp_path)
    assert [r["text"] for r in all_records] == [SHORTEST, LONGEST, SHORTEST]
    assert all(r["image"] == str((tmp_path / "images" / n).resolve()) for r, n in
               zip(all_records, ("a.jpg", "b.jpg", "c.jpg"), strict=True))
    train = load_records(tmp_path / "dataset.jsonl", split="train")
    assert [r["image"] for r in train] == [all_records[0]["image"], all_records[2]["image"]]
    with pytest.raises(UserError, match="splits present: train, validation"):
        load_records(tmp_path, split="test")
    # "val" (earlier datasets' name, and a habit) is read as "validation", both ways
    assert [r["split"] for r in all_records] == ["train", "validation", "train"]
    assert load_records(tmp_path, split="val") == load_records(tmp_path, split="validation")
    assert [r["text"] for r in load_records(tmp_path, split="validation")] == [LONGEST]


def test_images_outside_the_dataset_folder_need_allow_outside(tmp_path):
    image = tmp_path / "elsewhere" / "x.png"
    image.parent.mkdir()
    _image().save(image)
    for path in (str(image), "../elsewhere/x.png", "images/../../elsewhere/x.png"):
        _write_dataset(tmp_path / "data", [{"image": "images/a.jpg", "text": SHORTEST},
                                           {"image": path, "text": SHORTEST}])
        with pytest.raises(UserError, match=r"dataset\.jsonl:2: image .* is outside the folder"
                                             r".*--allow-outside-paths"):
            load_records(tmp_path / "data")
        assert load_records(tmp_path / "data", allow_outside=True)[1]["image"] == str(image)
    inside = tmp_path / "data" / "images" / "a.jpg"
    _write_dataset(tmp_path / "data", [{"image": str(inside), "text": SHORTEST}])
    assert load_records(tmp_path / "data")[0]["image"] == str(inside)  # absolute but inside


@pytest.mark.parametrize("record, message", [
    ({"image": None, "text": SHORTEST}, "field 'image' must be a string"),
    ({"image": "images/a.jpg", "text": 3}, "field 'text' must be a string"),
    ({"image": "images/a.jpg", "text": " "}, "field 'text' is empty"),
    ({"image": "images/a.jpg", "text": SHORTEST, "split": 1}, "field 'split' has the wrong type"),
    ({"image": "images/a.jpg", "text": SHORTEST, "votes": [40]}, "field 'votes' has the wrong type"),
])
def test_fields_of_the_wrong_type_name_file_line_and_field(tmp_path, record, message):
    _write_dataset(tmp_path, [{"image": "images/b.jpg", "text": SHORTEST}, record])
    with pytest.raises(UserError, match=r"dataset\.jsonl:2: " + message):
        load_records(tmp_path)


def test_load_records_errors(tmp_path):
    _write_dataset(tmp_path, [{"image": "images/a.jpg", "text": SHORTEST}, "", "{not json"])
    with pytest.raises(UserError, match=r"dataset\.jsonl:3: malformed JSON"):
        load_records(tmp_path)
    _write_dataset(tmp_path, [{"image": "images/missing.jpg", "text": SHORTEST}])
    with pytest.raises(UserError, match="images/missing.jpg"):
        load_records(tmp_path)
    _write_dataset(tmp_path, [{"image": "images/a.jpg"}])
    with pytest.raises(UserError, match=":1: a record needs"):
        load_records(tmp_path)
    _write_dataset(tmp_path, ['["images/a.jpg", "a caption"]'])
    with pytest.raises(UserError, match=":1: a record needs"):
        load_records(tmp_path)
    _write_dataset(tmp_path, [{"image": "images/a.jpg", "text": SHORTEST}])
    with pytest.raises(UserError, match="splits present: none"):
        load_records(tmp_path, split="train")
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "nowhere")


def test_load_image_errors(tmp_path, monkeypatch):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.jpg is not an image"):
        load_image(text)
    with pytest.raises(UserError, match="notes.jpg is not an image"):
        load_image(text, decode=False)
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.png")
    path = tmp_path / "big.png"
    _image(size=64).save(path)
    assert load_image(path).mode == "RGB"
    assert load_image(path, decode=False) is None  # header only: a cheap check
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x73 px is over twice this
    with pytest.raises(UserError, match="decompression-bomb"):
        load_image(path)


def test_load_image_converts_to_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 8), 128).save(gray)
    im = load_image(gray)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (128, 128, 128)
    assert {".jpg", ".jpeg", ".png"} <= set(IMAGE_SUFFIXES)


def test_prepared_dataset_records(request, family):
    """Records of the shared prepared dataset load by split and encode as training examples."""
    pytest.importorskip("galaxy_llava.prepare")
    from galaxy_llava.models.encoding import IGNORE_INDEX, encode_example

    prepared = request.getfixturevalue("prepared_dir")
    records = load_records(prepared, split="train")
    assert records and all(r["split"] == "train" for r in records)
    processor = request.getfixturevalue("tiny_processor")
    ex = encode_example(processor, family, records[0]["image"], records[0]["text"])
    answer = ex["input_ids"][ex["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer[:-1]) == records[0]["text"]


def test_dataset_folder_is_the_folder_of_a_jsonl_path(tmp_path):
    from galaxy_llava.records import dataset_folder

    (tmp_path / "d").mkdir()
    assert dataset_folder(tmp_path / "d") == tmp_path / "d"
    assert dataset_folder(tmp_path / "d" / "dataset.jsonl") == tmp_path / "d"


def _photo() -> Image.Image:
    """A real photograph shipped with matplotlib (8-bit), as grey: the 8-bit export."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("L")


@pytest.mark.parametrize("kind", ["png16", "tiff16", "tiff_float"])
def test_deep_rasters_equal_their_8_bit_export(tmp_path, kind):
    """A 16-bit PNG came out pure white (PIL's convert("RGB") clips mode I;16); 16-bit and float
    rasters are scaled to 8 bits and equal the 8-bit export of the same picture."""
    grey = _photo()
    eight = np.asarray(grey)
    if kind == "tiff_float":
        deep, path = Image.fromarray(eight.astype(np.float32) / 255), tmp_path / "p.tif"
    else:
        deep = Image.fromarray(eight.astype(np.uint16) * 257)  # 0..255 -> 0..65535
        path = tmp_path / ("p.png" if kind == "png16" else "p.tiff")
    deep.save(path)
    assert Image.open(path).mode in ("I;16", "I", "F")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(grey.convert("RGB")))


def test_empty_and_truncated_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty.png is an empty file"):
        load_image(tmp_path / "empty.png", decode=False)
    _photo().convert("RGB").save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    assert load_image(tmp_path / "cut.jpg", decode=False) is None  # the header is whole
    with pytest.raises(UserError, match="cut.jpg: cannot read the image"):
        load_image(tmp_path / "cut.jpg")
