"""imagefiles: which files are images (recursive folders, prepared datasets, path lists) and
FITS cutouts stretched to RGB with the decompression-bomb guard."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from PIL import Image

from galaxy_llava.errors import UserError
from galaxy_llava.fitscutouts import FitsOptions, read_fits_rgb
from galaxy_llava.imagefiles import find_images, image_stem, read_path_list
from galaxy_llava.records import load_image


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
    pd.DataFrame({"path": ["../x.png"]}).to_csv(tmp_path / "imgs" / "out.csv", index=False)
    with pytest.raises(UserError, match="outside the folder"):
        read_path_list(tmp_path / "imgs" / "out.csv")
    pd.DataFrame({"name": ["a.png"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="needs a column named one of path, file_loc, image"):
        read_path_list(tmp_path / "bad.parquet")
    pd.DataFrame({"path": []}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(UserError, match="no rows"):
        read_path_list(tmp_path / "empty.csv")


def test_fits_one_band_is_grey_and_oriented_like_the_image(tmp_path):
    data = np.zeros((16, 24), np.float32)
    data[-1, 0] = 100.0  # FITS row -1 is the top row of the picture
    data[0, :] = 1.0
    fits.PrimaryHDU(data).writeto(tmp_path / "a.fits")
    im = load_image(tmp_path / "a.fits")
    px = np.asarray(im)
    assert im.mode == "RGB" and im.size == (24, 16)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    assert px[0, 0, 0] == 255 and px[1:-1].max() == 0 and px[-1, 5, 0] > 0


def test_fits_three_bands_map_blue_to_red_and_extension_hdus_are_found(tmp_path):
    cube = np.zeros((3, 32, 32), np.float32)
    cube[0, 2:6, 2:6] = 1.0  # a source in the bluest band (g) only -> blue
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube)])
    hdus.writeto(tmp_path / "c.fits.gz")
    for scaling in ("lupton", "percentile"):
        px = np.asarray(read_fits_rgb(tmp_path / "c.fits.gz", FitsOptions(scaling=scaling)))
        assert px[-6:-2, 2:6, 2].min() == 255 and px[..., :2].max() == 0, scaling  # bottom-up
        assert px[:2, :, 2].max() == 0  # the sky (level 0) stays black


def test_fits_guard_and_bad_files_are_user_errors(tmp_path):
    fits.PrimaryHDU(np.zeros((20, 20), np.float32)).writeto(tmp_path / "big.fits")
    with pytest.raises(UserError, match="decompression-bomb guard"):
        read_fits_rgb(tmp_path / "big.fits", max_pixels=100)
    assert read_fits_rgb(tmp_path / "big.fits", decode=False) is None
    fits.PrimaryHDU(np.zeros((5, 4, 4), np.float32)).writeto(tmp_path / "five.fits")
    with pytest.raises(UserError, match="a cube of 5 planes .*choose 1 or 3 with --bands"):
        read_fits_rgb(tmp_path / "five.fits")
    with pytest.raises(UserError, match="a cube of 5 planes .*choose 1 or 3 with --bands"):  # from the header alone
        read_fits_rgb(tmp_path / "five.fits", decode=False)
    (tmp_path / "junk.fits").write_text("not fits")
    with pytest.raises(UserError, match="junk.fits"):
        load_image(tmp_path / "junk.fits")
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.fits")
