"""Which files are galaxy images, and how to open the survey kinds (FITS cutouts).

One home for what ``describe``, ``catalogue`` and ``serve`` read as images:

* :func:`find_images`: a folder searched recursively for image files (hidden entries skipped,
  sorted by their path inside the folder). A prepared dataset (``galaxy-llava prepare``: it
  holds ``dataset.jsonl``, or a ``manifest.json`` that is not a catalogue's) contributes only its
  ``images/`` folder, so its ``preview.png`` and other non-galaxy files are never read, by
  design rather than by luck.
* :func:`read_path_list`: a CSV or parquet file listing image paths (column ``path``,
  ``file_loc`` or ``image``; optional ``id``/``id_str``), relative paths resolved against the
  list's folder and kept inside it unless the caller allows otherwise.
* :func:`read_fits_rgb`: a ``.fits``/``.fits.gz`` cutout as an RGB image: an asinh stretch
  between the 0.5th and 99.5th percentiles (astropy.visualization), one band as grey, three
  bands (planes in order of increasing wavelength, such as g, r, i) as blue, green, red, the
  way SDSS colour composites map them. The pixel count is checked from the header before any
  data is read (the decompression-bomb guard, as for PNG/JPEG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from galaxy_llava.errors import UserError
from galaxy_llava.io import read_json_object

RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")
FITS_SUFFIXES = (".fits", ".fit", ".fits.gz", ".fit.gz", ".fits.fz")
IMAGE_SUFFIXES = RASTER_SUFFIXES + FITS_SUFFIXES
LIST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "file_loc", "image")
ID_COLUMNS = ("id", "id_str")


def is_fits(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a FITS file (by its suffix, case-insensitive)."""
    return str(path).lower().endswith(FITS_SUFFIXES)


def is_image_name(name: str) -> bool:
    """Whether a file name is one of the image kinds galaxy-llava reads."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``a.fits.gz`` -> ``a``): a galaxy's default id."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def is_prepared_dataset(root: Path) -> bool:
    """A folder written by ``galaxy-llava prepare``: its ``dataset.jsonl``, or a manifest of
    prepare's format (a catalogue's or anyone else's manifest does not count)."""
    if (root / "dataset.jsonl").is_file():
        return True
    # prepare's manifest names its format; anyone else's manifest.json says nothing about images.
    return str(read_json_object(root / "manifest.json").get("format", "")).startswith(
        "galaxy-llava-prepared/")


def find_images(folder: str | os.PathLike, flag: str = "--images") -> list[Path]:
    """The image files under ``folder`` (recursive, hidden entries skipped, sorted by their path
    inside it; a prepared dataset gives only its ``images/``); no image at all is a UserError.

    Links to files are read (the user put them in the folder they named); links to folders are
    not descended, so a link cycle cannot make the search endless."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{flag} {folder}: {'not a folder' if root.exists() else 'not found'}")
    if is_prepared_dataset(root):
        root = root / "images"
        if not root.is_dir():
            raise UserError(f"{flag} {folder}: a prepared dataset without an images/ folder")
    found = []
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(path) / n for n in files
                  if is_image_name(n) and (Path(path) / n).is_file()]
    if not found:
        raise UserError(f"{flag} {folder}: no images in it "
                        f"({', '.join(s for s in IMAGE_SUFFIXES)})")
    return sorted(found, key=lambda f: f.relative_to(root).parts)


@dataclass
class PathList:
    """The images a path list names: absolute paths and ids (the id column, else the stem)."""

    paths: list[str]
    ids: list[str]


def read_path_list(file: str | os.PathLike, allow_outside: bool = False,
                   flag: str = "--images") -> PathList:
    """The images listed in a CSV or parquet file (see the module's docstring). Missing columns,
    empty lists and paths leaving the list's folder are one-line UserErrors."""
    import pandas as pd

    from galaxy_llava.checks import contained

    file = Path(file)
    try:
        table = (pd.read_parquet(file) if file.suffix.lower() == ".parquet"
                 else pd.read_csv(file, dtype=str, keep_default_na=False))
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{flag} {file}: cannot read the path list: {e}") from None
    column = next((c for c in PATH_COLUMNS if c in table.columns), None)
    if column is None:
        raise UserError(f"{flag} {file}: a path list needs a column named one of "
                        f"{', '.join(PATH_COLUMNS)} (it has {', '.join(map(str, table.columns))})")
    if len(table) == 0:
        raise UserError(f"{flag} {file}: the path list has no rows")
    root = file.resolve().parent
    paths = []
    for i, value in enumerate(table[column].tolist()):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{flag} {file}: row {i + 1} has no path in column {column!r}")
        paths.append(str(contained(value.strip(), root, allow_outside, f"{flag} {file}")))
    id_column = next((c for c in ID_COLUMNS if c in table.columns), None)
    ids = ([str(v) for v in table[id_column].tolist()] if id_column
           else [image_stem(p) for p in paths])
    return PathList(paths, ids)


def _fits_data(path: str | os.PathLike, max_pixels: int, read: bool = True):
    """The first HDU with 2-D or 3-D image data, its pixel count checked against ``max_pixels``
    from the header before the data is read (``read=False``: the header check only)."""
    from astropy.io import fits

    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdus:
        for hdu in hdus:
            header = hdu.header
            naxis = int(header.get("NAXIS", 0) or header.get("ZNAXIS", 0) or 0)
            if naxis not in (2, 3):
                continue
            key = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
            width, height = int(header[f"{key}1"]), int(header[f"{key}2"])
            planes = int(header[f"{key}3"]) if naxis == 3 else 1
            if planes not in (1, 3):  # refused from the header: a deep cube is never read
                raise UserError(f"{path}: a FITS cube needs 1 or 3 planes, it has {planes}")
            if width * height > max_pixels:
                raise UserError(f"{path} is too large to open safely ({width}x{height}; "
                                "decompression-bomb guard)")
            if not read:
                return None
            data = hdu.data
            if data is not None:
                return data
    raise UserError(f"{path} has no 2-D image or 3-band cube in any HDU")


def read_fits_rgb(path: str | os.PathLike, max_pixels: int | None = None, decode: bool = True):
    """A FITS cutout as an RGB PIL image (asinh stretch; see the module's docstring); with
    ``decode=False`` only its headers are checked (None). Unreadable files are UserErrors."""
    import numpy as np
    from astropy.visualization import AsinhStretch, PercentileInterval
    from PIL import Image

    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    try:
        data = _fits_data(path, max_pixels, read=decode)
        if not decode:
            return None
        data = np.asarray(data, dtype=np.float64)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read FITS image {path}: {e}") from None
    if data.ndim == 3:
        if data.shape[0] == 1:
            data = data[0]
        elif data.shape[0] == 3:
            data = data[::-1]  # planes blue -> red in wavelength order; RGB wants red first
        else:
            raise UserError(f"{path}: a FITS cube needs 1 or 3 planes, it has {data.shape[0]}")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    # One interval over all bands keeps the colours; asinh shows faint outskirts and bright cores.
    lo, hi = PercentileInterval(99.0).get_limits(data)
    scaled = np.clip((data - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(data)
    stretched = AsinhStretch(a=0.1)(scaled)
    pixels = (np.clip(stretched, 0, 1) * 255).round().astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3)
    # FITS rows run bottom-up; images top-down.
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)[::-1]))
