"""Prepared datasets as records (``dataset.jsonl`` + images) and safe image loading.

A record: ``{"image", "text", "id_str", "split", "morphology", "fractions", "votes"}``; image paths are
resolved against the dataset folder and must stay inside it (unless the caller allows otherwise).
Images open through one guarded function (decompression-bomb guard, one-line errors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from galaxy_llava.checks import contained
from galaxy_llava.errors import UserError
from galaxy_llava.fitscutouts import FitsOptions, is_fits, read_fits_rgb

# A prepared dataset's splits, by Hugging Face's names (``load_dataset`` gives these too).
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}  # what galaxy-llava before 0.x called it: still read


def split_name(name: str) -> str:
    """The split ``name`` means: ``val`` (an alias kept for older datasets and habits) is
    ``validation``; any other name as it is."""
    return SPLIT_ALIASES.get(name, name)


def load_image(path, decode: bool = True, options: FitsOptions | None = None
               ) -> Image.Image | None:
    """Open an image as RGB; a missing, non-image, empty or decompression-bomb file is a
    UserError.

    With ``decode=False`` only the header is read (a cheap check that the file is an image).
    FITS cutouts (``.fits``, ``.fits.gz``; a tuple of one object's single-band files) become RGB
    by ``options`` (:func:`galaxy_llava.fitscutouts.read_fits_rgb`); 16-bit and float rasters are
    scaled to 8 bits (:func:`to_rgb8`)."""
    if isinstance(path, (tuple, list)) or is_fits(path):
        return read_fits_rgb(path, options, decode=decode)
    try:
        with Image.open(path) as im:
            # PIL only refuses above twice MAX_IMAGE_PIXELS; refuse above it, like the catalogue.
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{im.width}x{im.height}")
            if im.width * im.height == 0:
                raise UserError(f"{path}: the image has no pixels (zero-size image)")
            return to_rgb8(im) if decode else None
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except UnidentifiedImageError:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise UserError(f"{path} is {'an empty file' if empty else 'not an image file PIL can read'}"
                        ) from None
    except Image.DecompressionBombError:
        raise UserError(f"{path} is too large to open safely (decompression-bomb guard)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the image: {e}") from None


def unreadable(images, indices: Iterable[int], options: FitsOptions | None = None,
               strict: bool = False) -> dict[int, str]:
    """``{index: reason}`` for each of ``images[indices]`` whose header already shows it cannot
    be read (checked before any model loads; no pixel decoded); with ``strict`` the first such
    file is the error instead."""
    bad = {}
    for k in indices:
        try:
            load_image(images[k], decode=False, options=options)
        except UserError as e:
            if strict:
                raise
            bad[k] = str(e)
    return bad


def to_rgb8(im: Image.Image) -> Image.Image:
    """An RGB image with 8 bits a channel. 16-bit integers (PNG, TIFF) are scaled from their
    full range (the value / 257: what an 8-bit export gives); floats in [0, 1] from that range,
    other floats and wider integers from their own minimum and maximum. PIL's ``convert("RGB")``
    clips 16-bit values instead, turning a deep picture white."""
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im.convert("RGB")
    import numpy as np

    data = np.asarray(im, dtype=np.float64)
    finite = data[np.isfinite(data)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scaled = np.clip((np.nan_to_num(data, nan=lo) - lo) / ((hi - lo) or 1.0), 0, 1)
    grey = (scaled * 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _jsonl_path(data: str | os.PathLike) -> Path:
    path = Path(data)
    if path.is_dir():
        path = path / "dataset.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found (expected a prepared data folder or its dataset.jsonl)")
    return path


def _parse_lines(path: Path, lines: Iterable[str], root: Path,
                 allow_outside: bool) -> list[dict]:
    """Records with their fields checked and image paths resolved (and contained) by line."""
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"image", "text"} <= set(record):
            raise UserError(f"{path}:{lineno}: a record needs \"image\" and \"text\" fields")
        _check_fields(record, f"{path}:{lineno}")
        if record.get("split") is not None:
            record["split"] = split_name(record["split"])
        record["image"] = str(contained(record["image"], root, allow_outside, f"{path}:{lineno}"))
        records.append(record)
    return records


# Optional fields and the type each must have when present.
_OPTIONAL = {"split": str, "id_str": (str, int), "morphology": dict, "fractions": dict,
             "votes": dict}


def _check_fields(record: dict, where: str) -> None:
    """Each field of the type the rest of the pipeline needs, named with its file:line."""
    for field in ("image", "text"):
        value = record[field]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {field!r} must be a string "
                            f"(got {type(value).__name__} {value!r:.40})")
        if not value.strip():
            raise UserError(f"{where}: field {field!r} is empty")
    for field, kind in _OPTIONAL.items():
        value = record.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise UserError(f"{where}: field {field!r} has the wrong type "
                            f"({type(value).__name__})")


def load_records(data: str | os.PathLike, split: str | None = None,
                 allow_outside: bool = False) -> list[dict]:
    """Records of a prepared dataset (folder or ``dataset.jsonl``), optionally one split only.

    Image paths are resolved against the JSONL's folder and made absolute; an image outside that
    folder (``../x.jpg``, an absolute path elsewhere) is refused unless ``allow_outside``. A
    missing image, a malformed line or a field of the wrong type (with its line number) or an
    unknown or empty split is a UserError. Splits are named as in :data:`SPLITS` (a record's or
    ``split``'s ``val`` reads as ``validation``)."""
    path = _jsonl_path(data)
    root = path.parent.resolve()
    try:
        with open(path, encoding="utf-8") as f:
            records = _parse_lines(path, f, root, allow_outside)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (expected one JSON record per line)") from None
    if split is not None:
        split = split_name(split)
        present = sorted({str(r.get("split")) for r in records if r.get("split") is not None})
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise UserError(f"split {split!r} is empty or absent in {path}; "
                            f"splits present: {', '.join(present) or 'none'}")
    for r in records:
        if not Path(r["image"]).is_file():
            raise UserError(f"image {r['image']} of {path} not found")
    return records


def dataset_folder(data: str | os.PathLike) -> Path:
    """The folder of a prepared dataset named by its folder or by its JSONL file (what
    :func:`load_records` takes): a ``.jsonl`` path that is not a folder means its parent.
    Where a dataset is named, not read (a manifest beside it, a report's image roots), this
    gives the folder the same way the loader would."""
    path = Path(data).expanduser()
    return path.parent if path.suffix == ".jsonl" and not path.is_dir() else path
