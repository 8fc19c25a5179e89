"""Read a Galaxy Zoo 2 catalogue: vote columns in memory, images fetched only when asked for.

Four kinds of source, told apart by what is on disk:

* a Hub id such as ``mwalmsley/gz2`` (``datasets.load_dataset`` with config and split);
* a parquet file, or a folder of parquet shards (the Hub's layout: an ``image`` struct column
  ``{bytes, path}``, ``id_str`` and the vote columns). A copy of a whole dataset repository holds
  one folder per config (``data/`` for the default one, ``tiny/``, ...; or as its README's
  ``configs:`` say): only the config ``hub_config`` names is read, never a mix;
* a ``Dataset.save_to_disk`` folder (a ``DatasetDict`` folder picks ``hub_split``);
* a CSV with a ``file_loc`` column of image paths (relative to the CSV's folder, or absolute).

Image paths (CSV ``file_loc``, a parquet row's image ``path``) must stay inside the catalogue's
folder unless the caller allows otherwise.

Selecting galaxies needs a dozen numeric columns, while the images are most of the bytes, so
:func:`load_catalog` reads only ``id_str`` and the columns the rule set needs (the notebook
decoded all 172k images just to read one column; defect 7). Images are read afterwards, row
group by row group, for the selected rows only (:meth:`Catalog.image_bytes`).
"""

from __future__ import annotations

import io
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from galaxy_llava.checks import inside
from galaxy_llava.errors import UserError
from galaxy_llava.layouts import parquet_shards
from galaxy_llava.rules import rule_set

ID_COLUMN = "id_str"
IMAGE_COLUMN = "image"
PATH_COLUMN = "file_loc"
# Columns a catalogue carries through to what is made from it (galaxy-llava catalogue's rows).
CARRIED = ("ra", "dec", "dataset_name")
# PIL's own default, used only if a caller has unset Image.MAX_IMAGE_PIXELS: the guard stays on.
_DEFAULT_MAX_PIXELS = 89_478_485
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# One image payload as stored: HF Image struct {bytes, path}, raw bytes, or a path string.
Fetch = Callable[[list[int]], Iterator[tuple[int, Any]]]


class ImageError(ValueError):
    """An image that cannot be used (unreadable, truncated, missing, too large)."""


class Catalog:
    """A GZ2 catalogue: ``votes`` (``id_str`` + the rule set's columns, float64, one row per
    galaxy, positional index), ``carried`` (those of :data:`CARRIED` it has, such as ra and
    dec) and images fetched on demand by row position."""

    def __init__(self, source: str, kind: str, votes: pd.DataFrame, fetch: Fetch,
                 base_dir: Path | None = None, allow_outside: bool = False):
        carried = [c for c in CARRIED if c in votes.columns]
        self.carried = votes[carried].reset_index(drop=True)
        self.source, self.kind, self.votes = source, kind, votes.drop(columns=carried)
        self._fetch, self._base_dir, self._allow_outside = fetch, base_dir, allow_outside

    def __len__(self) -> int:
        return len(self.votes)

    def __repr__(self) -> str:
        return f"Catalog({self.kind} {self.source!r}, {len(self)} rows)"

    def image_bytes(self, rows: Iterable[int]) -> Iterator[tuple[int, bytes | None, str | None]]:
        """Encoded image of each row as ``(row, bytes, None)`` or ``(row, None, reason)``.

        Rows come back in storage order (each parquet row group is read once), not input order."""
        for row, payload in self._fetch(sorted(set(int(r) for r in rows))):
            try:
                yield row, _payload_bytes(payload, self._base_dir, self._allow_outside), None
            except ImageError as e:
                yield row, None, str(e)

    def check_paths(self) -> None:
        """Refuse, in one line, the first stored image path outside the catalogue's folder.

        Cheap for a CSV (its paths are in memory); elsewhere paths are checked as images are
        read."""
        if self._base_dir is None or self._allow_outside:
            return
        for row, payload in self._fetch(list(range(len(self)))):
            if isinstance(payload, str) and payload:
                path = Path(payload).expanduser()
                if not inside(path if path.is_absolute() else self._base_dir / path,
                              self._base_dir):
                    raise UserError(f"row {row + 1} of {self.source}: "
                                    + outside_message(payload, self._base_dir))

    def image(self, i: int) -> Image.Image:
        """The decoded RGB image of row ``i``; an unreadable image is a :class:`UserError`."""
        ((_, data, err),) = list(self.image_bytes([i]))
        try:
            if err:
                raise ImageError(err)
            return decode_image(data).convert("RGB")
        except ImageError as e:
            raise UserError(f"galaxy {self.votes[ID_COLUMN].iat[i]}: {e}") from None


def outside_message(path: str, base_dir: Path) -> str:
    """The one line for an image path that leaves the catalogue's folder."""
    return (f"catalogue image {path} is outside the catalogue's folder {base_dir}; images are "
            "read only from inside it unless you pass --allow-outside-paths (a CSV whose "
            "file_loc paths are absolute needs it)")


def decode_image(data: bytes) -> Image.Image:
    """Open and fully decode untrusted image bytes, refusing decompression bombs and truncation.

    Raises :class:`ImageError` (never a PIL-specific exception) with a short reason."""
    limit = Image.MAX_IMAGE_PIXELS or _DEFAULT_MAX_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
        # Check the header's size before decoding, so a bomb costs nothing to reject.
        if img.width * img.height > limit:
            raise ImageError(f"decompression bomb refused ({img.width}x{img.height} pixels)")
        img.load()  # decode now: a truncated file fails here, not later in a worker
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused ({e})") from None
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from None
    return img


def load_catalog(source: str | os.PathLike, rules: str = "reference",
                 hub_config: str | None = None, hub_split: str = "train",
                 allow_outside: bool = False) -> Catalog:
    """Open a catalogue (Hub id, parquet file/folder, save_to_disk folder or CSV) and check that
    ``id_str`` and every column the rule set needs are present and numeric.

    ``allow_outside``: read image paths that point outside the catalogue's folder."""
    cat = _open_catalog(source, rules, hub_config, hub_split)
    cat._allow_outside = allow_outside
    if cat.kind == "csv" and not allow_outside:
        cat.check_paths()
    return cat


def _open_catalog(source, rules: str, hub_config: str | None, hub_split: str) -> Catalog:
    needed = list(rule_set(rules).columns)  # an unknown name is a UserError
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                return _from_disk(path, needed, hub_split)
            return _from_parquet(path, parquet_shards(path, hub_config, hub_split), needed)
        suffix = path.name.lower()
        if suffix.endswith(".parquet"):
            return _from_parquet(path, [path], needed)
        if suffix.endswith((".csv", ".csv.gz")):
            return _from_csv(path, needed)
        raise UserError(f"source {text} is not a parquet or CSV file (nor a folder of them)")
    if _HUB_ID.match(text) and not text.lower().endswith((".csv", ".parquet")):
        return _from_hub(text, needed, hub_config, hub_split)
    raise UserError(f"source {text} not found: no such file or folder (and not a Hub id like "
                    "mwalmsley/gz2)")


# ---------------------------------------------------------------- validation

def _numeric(t: pa.DataType) -> bool:
    # An all-null shard (a question nobody reached) is typed null; it reads as NaN.
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t) \
        or pa.types.is_decimal(t)


def _check_schema(schema: pa.Schema, needed: list[str], where: str, extra: tuple[str, ...] = ()):
    """One-line UserError naming every missing or non-numeric column."""
    names = set(schema.names)
    missing = [c for c in [ID_COLUMN, *needed] if c not in names]
    wrong = [f"{c} ({schema.field(c).type})" for c in needed
             if c in names and not _numeric(schema.field(c).type)]
    if ID_COLUMN in names:
        t = schema.field(ID_COLUMN).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            wrong.append(f"{ID_COLUMN} ({t}, expected text)")
    if not any(c in names for c in extra) and extra:
        missing.append(" or ".join(extra))
    _raise_bad_columns(where, missing, wrong)


def _raise_bad_columns(where: str, missing: list[str], wrong: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if wrong:
        problems.append(f"non-numeric column(s) {', '.join(wrong)}")
    if problems:
        raise UserError(f"catalogue {where}: {'; '.join(problems)}")


def _votes_frame(table: pa.Table, needed: list[str]) -> pd.DataFrame:
    """id_str as text and the rule-set columns as float64 (nulls become NaN, like pandas)."""
    df = pd.DataFrame({ID_COLUMN: [None if v is None else str(v)
                                   for v in table.column(ID_COLUMN).to_pylist()]})
    for c in needed:
        df[c] = table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
    for c in _carried(table.schema):
        df[c] = table.column(c).to_pandas()
    return df


def _carried(schema: pa.Schema) -> list[str]:
    """The :data:`CARRIED` columns a schema has."""
    return [c for c in CARRIED if c in schema.names]


# ---------------------------------------------------------------- image payloads

def _payload_bytes(payload: Any, base_dir: Path | None, allow_outside: bool = False) -> bytes:
    if isinstance(payload, dict):
        if payload.get("bytes"):
            return payload["bytes"]
        payload = payload.get("path")
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str) and payload:
        path = Path(payload).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if base_dir is not None and not allow_outside and not inside(path, base_dir):
            raise UserError(outside_message(payload, base_dir))
        try:
            return path.read_bytes()
        except OSError as e:
            raise ImageError(f"image file {path} cannot be read ({e.strerror or e})") from None
    raise ImageError("no image stored for this row")


def _image_column(schema: pa.Schema, where: str) -> str:
    for c in (IMAGE_COLUMN, PATH_COLUMN):
        if c in schema.names:
            return c
    raise UserError(f"catalogue {where}: no {IMAGE_COLUMN} or {PATH_COLUMN} column to read "
                    "images from")


# ---------------------------------------------------------------- parquet

def _from_parquet(where: Path, files: list[Path], needed: list[str]) -> Catalog:
    frames, groups, starts, image_col, total = [], [], [], None, 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read parquet file {f}: {e}") from None
        schema = pf.schema_arrow
        _check_schema(schema, needed, str(f), extra=(IMAGE_COLUMN, PATH_COLUMN))
        col = _image_column(schema, str(f))
        if image_col not in (None, col):
            raise UserError(f"parquet shards under {where} disagree on the image column")
        image_col = col
        # Only id_str and the vote columns are read here; the image column stays on disk.
        frames.append(_votes_frame(pf.read(columns=[ID_COLUMN, *needed, *_carried(schema)]),
                                   needed))
        for rg in range(pf.metadata.num_row_groups):
            groups.append((f, rg))
            starts.append(total)
            total += pf.metadata.row_group(rg).num_rows
    votes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    starts_arr = np.asarray(starts, dtype=np.int64)

    def fetch(rows: list[int]) -> Iterator[tuple[int, Any]]:
        rows_arr = np.asarray(rows, dtype=np.int64)
        group_of = np.searchsorted(starts_arr, rows_arr, side="right") - 1
        open_file, pf = None, None
        for g in np.unique(group_of):
            f, rg = groups[g]
            if f != open_file:  # rows are sorted, so each file is opened once
                open_file, pf = f, pq.ParquetFile(f)
            mine = rows_arr[group_of == g]
            column = pf.read_row_group(rg, columns=[image_col]).column(0)
            values = column.take(pa.array(mine - starts_arr[g])).to_pylist()
            yield from zip(mine.tolist(), values)

    base = where if where.is_dir() else where.parent
    return Catalog(str(where), "parquet", votes, fetch, base_dir=base)


# ---------------------------------------------------------------- datasets (Hub, save_to_disk)

def _from_dataset(ds: Any, source: str, kind: str, needed: list[str],
                  base_dir: Path | None) -> Catalog:
    schema = ds.data.schema
    _check_schema(schema, needed, source, extra=(IMAGE_COLUMN, PATH_COLUMN))
    image_col = _image_column(schema, source)
    # The arrow format hands back raw columns: no Image feature is decoded, no row iterated.
    table = ds.select_columns([ID_COLUMN, *needed, *_carried(schema)]).with_format("arrow")[:]
    images = ds.select_columns([image_col]).with_format("arrow")

    def fetch(rows: list[int]) -> Iterator[tuple[int, Any]]:
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            yield from zip(chunk, images[chunk].column(0).to_pylist())

    return Catalog(source, kind, _votes_frame(table, needed), fetch, base_dir=base_dir)


def _from_disk(folder: Path, needed: list[str], split: str) -> Catalog:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read save_to_disk folder {folder}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"save_to_disk folder {folder} has splits {', '.join(ds)}, not "
                            f"{split!r}; pass --hub-split")
        ds = ds[split]
    return _from_dataset(ds, str(folder), "save_to_disk", needed, folder)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick probe: without it, huggingface_hub retries for ~25 s before giving up offline."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered, even if with an error status
    except (OSError, ValueError):
        return False
    return True


def _from_hub(repo: str, needed: list[str], config: str | None, split: str) -> Catalog:
    import datasets
    from huggingface_hub import constants

    unreachable = (f"{repo!r} is not a local path and the Hugging Face Hub is unreachable "
                   "({why}); pass a local copy instead, e.g. --source path/to/gz2 (a folder of "
                   "the Hub's parquet shards, a save_to_disk folder or a CSV with file_loc)")
    offline = _hub_offline()
    # Offline mode may still find a cached download, so try it; online, probe first.
    if not offline and not _hub_reachable():
        raise UserError(unreachable.format(why=f"no answer from {constants.ENDPOINT}; set "
                                               "HF_HUB_OFFLINE=1 to use a cached download"))
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"no dataset {repo!r} on the Hugging Face Hub (nor a local path)") from None
    except ConnectionError as e:
        why = "HF_HUB_OFFLINE=1 and no cached copy" if offline else str(e).splitlines()[0]
        raise UserError(unreachable.format(why=why)) from None
    except (ValueError, KeyError, FileNotFoundError) as e:  # unknown config or split
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load {repo!r} (config {config}, split {split}): {msg}") from None
    return _from_dataset(ds, repo, "hub", needed, None)


# ---------------------------------------------------------------- CSV

def _from_csv(path: Path, needed: list[str]) -> Catalog:
    try:
        header = pd.read_csv(path, nrows=0).columns
        missing = [c for c in [ID_COLUMN, *needed, PATH_COLUMN] if c not in header]
        _raise_bad_columns(str(path), missing, [])
        # Read only what selection needs; ids and paths stay text (GZ2 ids overflow float).
        df = pd.read_csv(path, usecols=[ID_COLUMN, PATH_COLUMN, *needed,
                                        *[c for c in CARRIED if c in header]],
                         dtype={ID_COLUMN: str, PATH_COLUMN: str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"cannot read CSV {path}: {str(e).splitlines()[0]}") from None
    wrong = [f"{c} ({df[c].dtype})" for c in needed
             if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]
    _raise_bad_columns(str(path), [], wrong)
    votes = df[[ID_COLUMN, *needed, *[c for c in CARRIED if c in df.columns]]].astype(
        {c: "float64" for c in needed})
    votes[ID_COLUMN] = votes[ID_COLUMN].where(votes[ID_COLUMN].notna(), None)
    paths = df[PATH_COLUMN].tolist()

    def fetch(rows: list[int]) -> Iterator[tuple[int, Any]]:
        for r in rows:
            p = paths[r]
            yield r, p if isinstance(p, str) else None

    return Catalog(str(path), "csv", votes.reset_index(drop=True), fetch, base_dir=path.parent)
