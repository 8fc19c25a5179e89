"""Which files are galaxy images, and what ``describe`` and ``catalogue`` read as inputs.

* :func:`find_images`: a folder searched recursively for image files (JPEG, PNG, TIFF, FITS;
  hidden entries skipped, sorted by their path inside the folder). A prepared dataset
  (``galaxy-llava prepare``: it holds ``dataset.jsonl``, or a ``manifest.json`` of prepare's
  format) contributes only its ``images/`` folder, so its ``preview.png`` and other non-galaxy
  files are never read, by design rather than by luck.
* :func:`read_path_list`: a CSV or parquet file listing image paths (column ``path``,
  ``file_loc`` or ``image``, or one ``path_<band>`` column per band; optional ``id``/``id_str``),
  relative paths resolved against the list's folder and kept inside it unless the caller allows
  otherwise; its other columns (ra, dec, anything) come along.
* :func:`gather_images`: folders, lists and files together, with unique ids, single-band FITS
  files of one object grouped (:func:`group_bands`).

FITS cutouts become RGB in :mod:`galaxy_llava.fitscutouts`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from galaxy_llava.checks import contained
from galaxy_llava.errors import UserError
from galaxy_llava.fitscutouts import FITS_SUFFIXES, is_fits
from galaxy_llava.io import read_json_object
from galaxy_llava.records import load_records

if TYPE_CHECKING:
    import pandas as pd

RASTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
IMAGE_SUFFIXES = RASTER_SUFFIXES + FITS_SUFFIXES
LIST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "file_loc", "image")
ID_COLUMNS = ("id", "id_str")


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
    """The images a path list names: absolute paths (a tuple of one path per band where the list
    has ``path_<band>`` columns), ids (the id column, else None), and the list's other columns."""

    paths: list
    ids: list
    columns: pd.DataFrame


def _read_table(file: Path, flag: str, text_columns: tuple[str, ...]):
    """A CSV or parquet table; in a CSV the path and id columns stay text exactly as written,
    the others get pandas' types (ra, dec as numbers)."""
    import pandas as pd

    try:
        if file.suffix.lower() == ".parquet":
            return pd.read_parquet(file)
        table = pd.read_csv(file)
        text = [c for c in table.columns if c in text_columns]
        if text:  # read again as written: an id "NA" or "007" is not a number or missing
            table[text] = pd.read_csv(file, usecols=text, dtype=str, keep_default_na=False)
        return table
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"{flag} {file}: cannot read the path list: {e}") from None


def read_path_list(file: str | os.PathLike, allow_outside: bool = False,
                   flag: str = "--images", bands: tuple[str, ...] = ()) -> PathList:
    """The images listed in a CSV or parquet file (see the module's docstring). Missing columns,
    empty lists, duplicate ids and paths leaving the list's folder are one-line UserErrors."""
    file = Path(file)
    band_columns = tuple(f"path_{b}" for b in bands)
    table = _read_table(file, flag, PATH_COLUMNS + ID_COLUMNS + band_columns)
    column = next((c for c in PATH_COLUMNS if c in table.columns), None)
    columns = [column] if column else [c for c in band_columns if c in table.columns]
    if not columns or (column is None and len(columns) < len(band_columns)):
        wanted = ", ".join(PATH_COLUMNS) + (f" (or {', '.join(band_columns)})"
                                            if band_columns else "")
        raise UserError(f"{flag} {file}: a path list needs a column named one of {wanted} "
                        f"(it has {', '.join(map(str, table.columns))})")
    if len(table) == 0:
        raise UserError(f"{flag} {file}: the path list has no rows")
    root = file.resolve().parent
    paths = []
    for i, values in enumerate(zip(*(table[c].tolist() for c in columns))):
        row = []
        for c, value in zip(columns, values):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{flag} {file}: row {i + 1} has no path in column {c!r}")
            row.append(str(contained(value.strip(), root, allow_outside, f"{flag} {file}")))
        paths.append(row[0] if column else tuple(row))
    id_column = next((c for c in ID_COLUMNS if c in table.columns), None)
    ids = [str(v) for v in table[id_column].tolist()] if id_column else [None] * len(paths)
    if id_column:
        refuse_duplicate_ids(ids, f"{flag} {file}: ids must be unique; repeated", "row")
    extra = table.drop(columns=[*columns, *([id_column] if id_column else [])])
    return PathList(paths, ids, extra.reset_index(drop=True))


def refuse_duplicate_ids(ids: list, what: str, unit: str, where: list | None = None) -> None:
    """One line naming each repeated id and where it occurs (rows, or the paths in ``where``)."""
    seen: dict = {}
    for k, i in enumerate(ids):
        seen.setdefault(i, []).append(k)
    repeated = {i: ks for i, ks in seen.items() if len(ks) > 1}
    if repeated:
        shown = [f"{i} ({unit}s {', '.join(str(k + 1) for k in ks)})" if where is None
                 else f"{i} ({', '.join(_shown(where[k]) for k in ks)})"
                 for i, ks in list(repeated.items())[:5]]
        raise UserError(f"{what}: {'; '.join(shown)}"
                        + (f"; and {len(repeated) - 5} more" if len(repeated) > 5 else ""))


def _shown(image) -> str:
    return " + ".join(map(str, image)) if isinstance(image, tuple) else str(image)


def image_label(image) -> str:
    """How an image input is named in rows and messages: its path, or its band files joined
    with ``;``."""
    return ";".join(map(str, image)) if isinstance(image, tuple) else str(image)


# ----------------------------------------------------------------- every input, with ids

@dataclass
class ImageInputs:
    """What ``describe`` and ``catalogue`` read, in input order: ``images`` (a path, or a tuple
    of one path per band), their unique ``ids`` and the user's own ``columns`` (a frame with one
    row per image; no columns when nobody gave any)."""

    images: list
    ids: list[str]
    columns: pd.DataFrame


_BAND_SUFFIX = "[-_.]"


def group_bands(files: list[Path], bands: tuple[str, ...]) -> list:
    """Single-band FITS files of one object (``J1234-g.fits``, ``J1234_r.fits``: the object's
    name, ``-``, ``_`` or ``.``, then the band) as one tuple per object in band order, placed
    where its first file was; a missing band is the file it would be (refused when read: not
    found). Other files pass through. Only with band names: indices name planes, not files."""
    if not bands:
        return list(files)
    pattern = re.compile(rf"^(.+){_BAND_SUFFIX}({'|'.join(map(re.escape, bands))})$",
                         re.IGNORECASE)
    out: list = []
    groups: dict[tuple[Path, str], list] = {}
    for f in files:
        m = pattern.match(image_stem(f)) if is_fits(f) else None
        if m is None:
            out.append(f)
            continue
        key = (f.parent, m.group(1))
        if key not in groups:
            groups[key] = [None] * len(bands)
            out.append(key)
        slot = [b.lower() for b in bands].index(m.group(2).lower())
        groups[key][slot] = f
    for slots in groups.values():  # a missing band: the file it would be (not found)
        first = next(f for f in slots if f is not None)
        stem = image_stem(first)
        name = pattern.match(stem).group(1)
        for k, f in enumerate(slots):
            if f is None:
                sep, suffix = stem[len(name)], first.name[len(stem):]
                slots[k] = first.parent / f"{name}{sep}{bands[k]}{suffix}"
    return [tuple(groups[x]) if isinstance(x, tuple) and x in groups else x for x in out]


def gather_images(entries, allow_outside: bool = False, bands: tuple[str, ...] = (),
                  flag: str = "--images", absolute: bool = True,
                  unique_ids: bool = True) -> ImageInputs:
    """Every image of ``entries`` in order: a folder's (:func:`find_images`, single-band files
    of one object grouped by :func:`group_bands`), a path list's (:func:`read_path_list`) or one
    image file. Ids: a prepared dataset's ``id_str``, a path list's id column, else the file
    name without its suffix; ids that collide become the path relative to the folder or list
    they came from, and ids that still collide (or repeat in a list) are refused in one line.
    ``absolute``: paths made absolute (else a folder's and a file's stay as given);
    ``unique_ids=False`` (``describe``: the same file may be named twice) skips the id checks
    across entries."""
    import pandas as pd

    images, ids, given, roots, frames = [], [], [], [], []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            known = _dataset_ids(p)
            root = p / "images" if is_prepared_dataset(p) else p
            files = find_images(p, flag)
            for f in files:  # a link in the folder may lead out of it
                contained(os.path.abspath(f), p, allow_outside, f"{flag} {entry}")
            found = group_bands([Path(os.path.abspath(f)) if absolute else f for f in files],
                                bands)
            for f in found:
                own = None if isinstance(f, tuple) else known.get(os.path.realpath(f))
                images.append(tuple(map(str, f)) if isinstance(f, tuple) else str(f))
                ids.append(own or _object_stem(f, bands))
                given.append(own is not None)
                roots.append(root)
            frames.append(pd.DataFrame(index=range(len(found))))
        elif p.is_file() and p.name.lower().endswith(LIST_SUFFIXES):
            listed = read_path_list(p, allow_outside, flag, bands)
            images += listed.paths
            ids += [i if i is not None else _object_stem(x, bands)
                    for i, x in zip(listed.ids, listed.paths)]
            given += [i is not None for i in listed.ids]
            roots += [p.resolve().parent] * len(listed.paths)
            frames.append(listed.columns)
        elif p.is_file() and is_image_name(p.name):
            images.append(os.path.abspath(p) if absolute else str(p))
            ids.append(image_stem(p))
            given.append(False)
            roots.append(Path(os.path.abspath(p)).parent)
            frames.append(pd.DataFrame(index=range(1)))
        else:
            raise UserError(f"{flag} {entry}: not a folder, an image or a .csv/.parquet list "
                            "of paths" if p.exists() else f"{flag} {entry}: not found")
    columns = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not unique_ids:
        return ImageInputs(images, ids, columns.reset_index(drop=True))
    refuse_duplicate_ids([i for i, g in zip(ids, given) if g],
                         f"{flag}: ids must be unique; repeated", "",
                         [x for x, g in zip(images, given) if g])
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    ids = [i if given[k] or counts[i] == 1 else _relative_id(images[k], roots[k], bands)
           for k, i in enumerate(ids)]
    refuse_duplicate_ids(ids, f"{flag}: two inputs get one id even as paths relative to their "
                         "folders; rename one, or catalogue them separately", "", images)
    return ImageInputs(images, ids, columns.reset_index(drop=True))


def _object_stem(image, bands: tuple[str, ...]) -> str:
    """A path's stem; for one object's band files, the stem without the band (``J1234``)."""
    if not isinstance(image, tuple):
        return image_stem(image)
    stem = image_stem(image[0])
    m = re.match(rf"^(.+){_BAND_SUFFIX}{re.escape(bands[0])}$", stem, re.IGNORECASE) \
        if bands else None
    return m.group(1) if m else stem


def _relative_id(image, root: Path, bands: tuple[str, ...]) -> str:
    """The id of an image whose stem collides: its path relative to its folder, POSIX style
    (an object's band files: their common name without the band)."""
    if isinstance(image, tuple):
        path = Path(image[0]).parent / _object_stem(image, bands)
    else:
        path = Path(image)
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return path.as_posix()


def _dataset_ids(folder: Path) -> dict[str, str]:
    """Real image path -> ``id_str`` of the prepared dataset ``folder`` is, or whose
    ``images/`` it is (empty for any other folder, or records without ids)."""
    for root in (folder, folder.parent if folder.name == "images" else None):
        if root is not None and is_prepared_dataset(root) and (root / "dataset.jsonl").is_file():
            return {os.path.realpath(r["image"]): str(r["id_str"])
                    for r in load_records(root, allow_outside=True)
                    if r.get("id_str") is not None}
    return {}
