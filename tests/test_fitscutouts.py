"""fitscutouts: FITS cutouts as surveys deliver them (image HDUs only, chosen bands, sky and bad
pixels, Lupton colour), tried on real FITS files that ship with astropy."""

from __future__ import annotations

from pathlib import Path

import astropy
import numpy as np
import pytest
from astropy.io import fits
from astropy.visualization import make_lupton_rgb

from galaxy_llava.errors import UserError
from galaxy_llava.fitscutouts import (FitsOptions, is_fits, parse_options, plane_names,
                                      read_fits_rgb)
from galaxy_llava.records import load_image

# Real files from astropy's own test data (installed with astropy, offline).
ASTROPY_DATA = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"


def _real(name: str) -> Path:
    path = ASTROPY_DATA / name
    if not path.is_file():
        pytest.skip(f"astropy's test file {name} is not installed")
    return path


def _noisy_cube(planes: int = 3, size: int = 48, seed: int = 0) -> np.ndarray:
    """Sky noise (sigma 1) on a pedestal of 100, and a round source brighter in redder bands."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    source = 200.0 * np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / 30.0)
    return np.stack([100.0 + rng.normal(0, 1, (size, size)) + source * (1 + k)
                     for k in range(planes)]).astype(np.float32)


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
    for decode in (True, False):  # refused from the header alone too
        with pytest.raises(UserError, match="a cube of 5 planes .*choose 1 or 3 with --bands"):
            read_fits_rgb(tmp_path / "five.fits", decode=decode)
    # photutils' PSF grids are cubes of 90 planes: named by their first and last few
    fits.PrimaryHDU(np.zeros((90, 5, 5), np.float32)).writeto(tmp_path / "psf.fits")
    with pytest.raises(UserError, match=r"a cube of 90 planes \(0, 1, 2, \.\.\., 88, 89\);"):
        read_fits_rgb(tmp_path / "psf.fits", decode=False)
    (tmp_path / "junk.fits").write_text("not fits")
    with pytest.raises(UserError, match="junk.fits"):
        load_image(tmp_path / "junk.fits")
    with pytest.raises(UserError, match="not found"):
        load_image(tmp_path / "missing.fits")


@pytest.mark.parametrize("name", ["table.fits", "logical_null.fits", "btable.fits",
                                  "random_groups.fits"])
def test_tables_are_never_read_as_images(name):
    """Real table-only files (one with logical columns: an internal error before) are refused
    in one line naming the file, header check included."""
    path = _real(name)
    for decode in (False, True):
        with pytest.raises(UserError, match=f"{name}: no image HDU in it"):
            load_image(path, decode=decode)


def test_the_first_image_hdu_with_pixels_is_read_after_a_table(tmp_path):
    """A table before the image (a catalogue FITS with a cutout appended) was read as the image:
    `Cannot cast array data from dtype((numpy.record, ...`."""
    image = _noisy_cube(1)[0]
    table = fits.BinTableHDU.from_columns([fits.Column("ra", "D", array=[1.0, 2.0])])
    fits.HDUList([fits.PrimaryHDU(), table, fits.ImageHDU(image)]).writeto(tmp_path / "t.fits")
    fits.PrimaryHDU(image).writeto(tmp_path / "plain.fits")
    assert np.array_equal(np.asarray(load_image(tmp_path / "t.fits")),
                          np.asarray(load_image(tmp_path / "plain.fits")))
    with pytest.raises(UserError, match="HDU 1 is a table, not an image"):
        read_fits_rgb(tmp_path / "t.fits", FitsOptions(hdu=1))


def test_fits_hdu_picks_an_extension_by_index_or_name():
    """HST's test0.fits (real): four SCI extensions; --fits-hdu picks one."""
    path = _real("test0.fits")
    first = np.asarray(read_fits_rgb(path))
    assert np.array_equal(first, np.asarray(read_fits_rgb(path, parse_options(hdu="SCI"))))
    assert np.array_equal(first, np.asarray(read_fits_rgb(path, parse_options(hdu="1"))))
    assert not np.array_equal(first, np.asarray(read_fits_rgb(path, parse_options(hdu="4"))))
    with pytest.raises(UserError, match="no HDU 'DQ'"):
        read_fits_rgb(path, parse_options(hdu="DQ"))


@pytest.mark.parametrize("name, message", [
    ("zerowidth.fits", "zero-size image"),        # NAXIS1 = 0: an IndexError before
    ("blank.fits", "no finite pixel"),            # every pixel BLANK: black before
    ("fixed-1890.fits", "a constant image"),      # every pixel 1890: black before
])
def test_pictureless_files_are_refused_naming_the_file(name, message):
    with pytest.raises(UserError, match=f"{name}: .*{message}"):
        load_image(_real(name))


def test_nan_pixels_take_the_sky_level_and_the_sky_is_subtracted(tmp_path):
    """HST's test0.fits (real: a sky pedestal of about 313 counts) with the frame's edge NaN.
    Before, NaN became 0 and the whole sky came out nearly white (median 254)."""
    sci = fits.getdata(_real("test0.fits"), 1).astype(np.float32)
    sci[:, :6] = np.nan
    fits.PrimaryHDU(sci).writeto(tmp_path / "edge.fits")
    px = np.asarray(load_image(tmp_path / "edge.fits"))[..., 0]
    sky = px[:, 6:]
    assert np.median(sky) < 30 and px.max() > 150  # a dark sky, a bright source
    kept = np.asarray(read_fits_rgb(tmp_path / "edge.fits", FitsOptions(keep_sky=True)))[..., 0]
    # --keep-sky: the pedestal shows, and the NaN edge has the sky's own level, not black
    assert np.median(kept[:, 6:]) > 100
    assert abs(float(np.median(kept[:, :6])) - float(np.median(kept[:, 6:]))) <= 2


def test_lupton_is_the_default_and_equals_astropy(tmp_path):
    cube = _noisy_cube() - 100.0  # no pedestal: what astropy is given is what we read
    fits.PrimaryHDU(cube).writeto(tmp_path / "gri.fits")
    ours = np.asarray(read_fits_rgb(tmp_path / "gri.fits",
                                    FitsOptions(stretch=5.0, q=9.0, keep_sky=True)))
    theirs = make_lupton_rgb(cube[2], cube[1], cube[0], minimum=0.0, stretch=5.0, Q=9.0)
    assert np.array_equal(ours, theirs[::-1])
    default = np.asarray(read_fits_rgb(tmp_path / "gri.fits"))
    assert np.array_equal(default, np.asarray(read_fits_rgb(
        tmp_path / "gri.fits", FitsOptions(scaling="lupton"))))
    assert not np.array_equal(default, np.asarray(read_fits_rgb(
        tmp_path / "gri.fits", FitsOptions(scaling="percentile"))))
    # The default stretch puts the sky's noise at about 10% grey: a dark, grainy sky.
    corner = default[:8, :8].mean(axis=2)
    assert 2 < corner.mean() < 40 and default[24, 24].max() == 255


def test_bands_choose_and_order_planes_by_index_or_header_name(tmp_path):
    """A Legacy-Survey-like g,r,i,z cube (BAND0..BAND3) was refused: `a FITS cube needs 1 or 3
    planes, it has 4`. --bands g,r,z (names) or 0,1,3 (indices) read the same picture as a
    cube of those three planes."""
    cube = _noisy_cube(4)
    header = fits.Header()
    for k, band in enumerate("griz"):
        header[f"BAND{k}"] = band
    fits.PrimaryHDU(cube, header).writeto(tmp_path / "griz.fits")
    fits.PrimaryHDU(cube[[0, 1, 3]]).writeto(tmp_path / "grz.fits")
    expected = np.asarray(read_fits_rgb(tmp_path / "grz.fits"))
    for bands in ("g,r,z", "G, R, Z", "0,1,3"):
        got = read_fits_rgb(tmp_path / "griz.fits", parse_options(bands=bands))
        assert np.array_equal(np.asarray(got), expected), bands
    with pytest.raises(UserError, match=r"a cube of 4 planes \(g, r, i, z\)"):
        read_fits_rgb(tmp_path / "griz.fits")
    with pytest.raises(UserError, match=r"no band 'u' \(--bands; its planes: g, r, i, z\)"):
        read_fits_rgb(tmp_path / "griz.fits", parse_options(bands="u,g,r"))
    with pytest.raises(UserError, match="--bands names 1 or 3 bands"):
        parse_options(bands="g,r")
    # A real 7-plane cube (astropy's arange.fits) by plane index
    arange = _real("arange.fits")
    assert read_fits_rgb(arange, parse_options(bands="0,3,6")).size == (11, 10)


def test_plane_names_from_filter_keywords_numbered_from_one():
    header = fits.Header([("FILTER1", "u"), ("FILTER2", "g"), ("FILTER3", "r")])
    assert plane_names(header, 3) == ["u", "g", "r"]
    assert plane_names(fits.Header([("FILTER", "VIS")]), 1) == ["VIS"]


def test_single_band_files_of_one_object_combine(tmp_path):
    cube = _noisy_cube()
    for band, plane in zip("grz", cube):
        fits.PrimaryHDU(plane).writeto(tmp_path / f"J1234-{band}.fits")
    fits.PrimaryHDU(cube).writeto(tmp_path / "cube.fits")
    files = [tmp_path / f"J1234-{b}.fits" for b in "grz"]
    assert np.array_equal(np.asarray(load_image(tuple(files))),
                          np.asarray(load_image(tmp_path / "cube.fits")))
    fits.PrimaryHDU(cube[0][:20]).writeto(tmp_path / "small-z.fits")
    with pytest.raises(UserError, match="band files differ in size"):
        load_image((files[0], files[1], tmp_path / "small-z.fits"))
    with pytest.raises(UserError, match="not found"):
        load_image((files[0], files[1], tmp_path / "J1234-missing.fits"))


def test_percentile_scaling_with_the_sky_kept_is_the_earlier_stretch():
    """--scaling percentile --keep-sky gives what galaxy-llava made before (an asinh stretch
    between the 0.5th and 99.5th percentiles of all bands), here on HST's scale.fits (real)."""
    from astropy.visualization import AsinhStretch, PercentileInterval

    path = _real("scale.fits")
    data = fits.getdata(path).astype(np.float64)
    lo, hi = PercentileInterval(99.0).get_limits(data)
    grey = (np.clip(AsinhStretch(a=0.1)(np.clip((data - lo) / (hi - lo), 0, 1)), 0, 1) * 255)
    before = grey.round().astype(np.uint8)[::-1]
    now = np.asarray(read_fits_rgb(path, FitsOptions(scaling="percentile", keep_sky=True)))
    assert np.array_equal(now[..., 0], before) and np.array_equal(now[..., 2], before)


@pytest.mark.parametrize("name, fits_file", [
    ("a.fits", True), ("A.FITS.GZ", True), ("dir/b.fit", True), ("c.fits.fz", True),
    ("d.png", False), ("fits", False), ("e.fits.txt", False)])
def test_is_fits_by_suffix_case_insensitive(name, fits_file):
    """Which files are FITS is decided here, by the suffix: the loader and the folder search
    both ask."""
    assert is_fits(name) is fits_file
    assert is_fits(Path(name)) is fits_file
