"""imagefiles: which files are images (recursive folders, prepared datasets, path lists), the
inputs of describe and catalogue with unique ids, the user's columns and band files grouped."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.imagefiles import (find_images, gather_images, group_bands, image_stem,
                                     read_path_list)


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def test_find_images_recursive_sorted_skipping_hidden_and_other_files(tmp_path):
    _png(tmp_path / "b" / "z.png")
    _png(tmp_path / "a.JPG".lower().replace("jpg", "png"))
    _png(tmp_path / ".hidden" / "x.png")
    _png(tmp_path / ".y.png")
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(tmp_path / "b" / "c.fits.gz")
    (tmp_path / "notes.txt").write_text("x")
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == ["a.png", "b/c.fits.gz", "b/z.png"]


def test_a_prepared_dataset_gives_only_its_images(tmp_path):
    _png(tmp_path / "preview.png")
    _png(tmp_path / "images" / "g1.jpg")
    (tmp_path / "dataset.jsonl").write_text("")
    assert [p.name for p in find_images(tmp_path)] == ["g1.jpg"]
    other = tmp_path / "catalogue"
    _png(other / "x.png")
    (other / "manifest.json").write_text(json.dumps({"command": "catalogue"}))
    assert [p.name for p in find_images(other)] == ["x.png"]
    foreign = tmp_path / "foreign"  # someone else's manifest.json: an ordinary folder
    _png(foreign / "images" / "a.png")
    _png(foreign / "b.png")
    (foreign / "manifest.json").write_text(json.dumps({"name": "my survey"}))
    assert [p.name for p in find_images(foreign)] == ["b.png", "a.png"]
    prepared = tmp_path / "prepared"
    _png(prepared / "images" / "g.png")
    _png(prepared / "preview.png")
    (prepared / "manifest.json").write_text(json.dumps({"format": "galaxy-llava-prepared/1"}))
    assert [p.name for p in find_images(prepared)] == ["g.png"]


def test_empty_folder_is_one_line_error_and_links_are_read_but_not_descended(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in it"):
        find_images(tmp_path / "empty")
    outside = _png(tmp_path / "outside.png")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "link.png").symlink_to(outside)
    (tmp_path / "f" / "loop").symlink_to(tmp_path / "f")  # a cycle: not followed
    assert [p.name for p in find_images(tmp_path / "f")] == ["link.png"]


def test_image_stem():
    assert image_stem("x/a.fits.gz") == "a" and image_stem("b.JPEG") == "b"
    assert image_stem("c.d.png") == "c.d"


def test_path_list_resolves_against_its_folder_and_stays_inside(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    pd.DataFrame({"file_loc": ["imgs/a.png"], "id_str": [587722]}).to_csv(tmp_path / "l.csv",
                                                                           index=False)
    listed = read_path_list(tmp_path / "l.csv")
    assert listed.paths == [str(tmp_path / "imgs" / "a.png")] and listed.ids == ["587722"]
    assert list(listed.columns.columns) == []
    pd.DataFrame({"path": ["../x.png"]}).to_csv(tmp_path / "imgs" / "out.csv", index=False)
    with pytest.raises(UserError, match="outside the folder"):
        read_path_list(tmp_path / "imgs" / "out.csv")
    pd.DataFrame({"name": ["a.png"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="needs a column named one of path, file_loc, image"):
        read_path_list(tmp_path / "bad.parquet")
    pd.DataFrame({"path": []}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(UserError, match="no rows"):
        read_path_list(tmp_path / "empty.csv")


def test_colliding_stems_get_paths_relative_to_their_folder(tmp_path):
    """sdss/J1234.png, legacy/J1234.png and legacy/J1234.fits all had the id J1234."""
    _png(tmp_path / "s" / "sdss" / "J1234.png")
    _png(tmp_path / "s" / "legacy" / "J1234.png")
    fits.PrimaryHDU(np.eye(4, dtype=np.float32)).writeto(tmp_path / "s" / "legacy" / "J1234.fits")
    _png(tmp_path / "s" / "legacy" / "J9999.png")
    found = gather_images([tmp_path / "s"])
    assert found.ids == ["legacy/J1234.fits", "legacy/J1234.png", "J9999", "sdss/J1234.png"]
    # The same folder twice: the same relative paths, refused naming them
    with pytest.raises(UserError, match="two inputs get one id.*legacy/J1234.fits"):
        gather_images([tmp_path / "s", tmp_path / "s"])


def test_a_path_list_with_repeated_ids_is_refused_naming_them(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    pd.DataFrame({"path": ["a.png", "b.png"], "id": ["NGC1300", "NGC1300"]}).to_csv(
        tmp_path / "l.csv", index=False)
    with pytest.raises(UserError, match=r"ids must be unique; repeated: NGC1300 \(rows 1, 2\)"):
        read_path_list(tmp_path / "l.csv")


def test_a_path_list_brings_its_own_columns_with_their_types(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    pd.DataFrame({"path": ["a.png", "b.png"], "ra": [150.1, 150.2], "dec": [2.5, -2.5],
                  "survey": ["sdss", "legacy"], "id": ["007", "NA"]}).to_csv(
        tmp_path / "l.csv", index=False)
    found = gather_images([tmp_path / "l.csv", tmp_path / "a.png"], allow_outside=True)
    assert found.ids == ["007", "NA", "a"]  # ids as written (no number or NaN guessing)
    assert found.columns["ra"].tolist()[:2] == [150.1, 150.2]
    assert found.columns["dec"].dtype == float and found.columns["survey"][1] == "legacy"
    assert found.columns["ra"].isna().tolist() == [False, False, True]


def test_single_band_files_group_by_object_and_band_columns_in_a_list(tmp_path):
    for obj in ("J1", "J2"):
        for band in "grz":
            fits.PrimaryHDU(np.eye(4, dtype=np.float32)).writeto(
                tmp_path / "euclid" / f"{obj}-{band}.fits" if (tmp_path / "euclid").is_dir()
                else _mkdir(tmp_path / "euclid") / f"{obj}-{band}.fits")
    (tmp_path / "euclid" / "J2-z.fits").unlink()  # a missing band: named when read
    _png(tmp_path / "euclid" / "other.png")
    found = gather_images([tmp_path / "euclid"], bands=("g", "r", "z"))
    folder = tmp_path / "euclid"
    assert found.ids == ["J1", "J2", "other"]
    assert found.images[0] == tuple(str(folder / f"J1-{b}.fits") for b in "grz")
    assert found.images[1][2] == str(folder / "J2-z.fits")
    assert group_bands([folder / "J1-g.fits"], ()) == [folder / "J1-g.fits"]  # no names: files
    pd.DataFrame({"path_g": ["J1-g.fits"], "path_r": ["J1-r.fits"], "path_z": ["J1-z.fits"],
                  "ra": [1.0]}).to_csv(folder / "list.csv", index=False)
    listed = read_path_list(folder / "list.csv", bands=("g", "r", "z"))
    assert listed.paths == [found.images[0]] and list(listed.columns.columns) == ["ra"]
    with pytest.raises(UserError, match="path_g, path_r, path_z"):
        read_path_list(folder / "list.csv", bands=("g", "r", "i"))
    # Euclid-like band names with underscores: the object is what precedes the band
    for band in ("NIR_Y", "NIR_J", "NIR_H"):
        fits.PrimaryHDU(np.eye(4, dtype=np.float32)).writeto(
            _mkdir(tmp_path / "nisp") / f"EUC_J3-{band}.fits")
    assert gather_images([tmp_path / "nisp"], bands=("NIR_Y", "NIR_J", "NIR_H")).ids == ["EUC_J3"]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
