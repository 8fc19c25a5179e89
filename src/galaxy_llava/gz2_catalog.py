"""Read a Galaxy Zoo 2 catalogue: vote columns in memory, images fetched only when asked for.

Four kinds of source, told apart by what is on disk:

* a Hub id such as ``mwalmsley/gz2`` (``datasets.load_dataset`` with config and split);
* a parquet file, or a folder of parquet shards (the Hub's layout: an ``image`` struct column
  ``{bytes, path}``, ``id_str`` and the vote columns). A copy of a whole dataset repository holds
  one folder per config (``data/`` for the default one, ``tiny/``, ...; or as its README's
  ``configs:`` say): only the config ``hub_config`` names is read, never a mix;
* a ``Dataset.save_to_disk`` folder (a ``DatasetDict`` folder picks ``hub_split``);
* a CSV with a ``file_loc`` column of image paths (relative to the CSV's folder, or absolute).

A parquet file or CSV may instead name each image by ``subfolder`` and ``filename`` under an
images folder, as galaxy-datasets' catalogues do (``gz2_train_catalog.parquet`` beside
``images/587722/587722981741363294.jpg``): the images folder is ``images_root`` when given, else
the catalogue's ``images/`` subfolder when there is one, else the catalogue's folder. Relative
``file_loc`` paths resolve against ``images_root`` too when it is given. Image paths must stay
inside that folder unless the caller allows otherwise.

Vote fractions: a ``{question}-gz2_{answer}_fraction`` column the file lacks (older revisions
of the Hub dataset hold only the counts) is derived from the answer's count and the question's
total votes; rule sets that read counts (``tree``) get count / total wherever the counts exist,
since the Hub stores fractions as float32 (:func:`galaxy_llava.gz2.share`). Callers may ask for
``extra`` columns (the records keep more fractions than the rules read): loaded or derived
where the catalogue has them, NaN where it has not.

Selecting galaxies needs a dozen numeric columns, while the images are most of the bytes, so
:func:`load_catalog` reads only ``id_str`` and the columns the rule set needs (the notebook
decoded all 172k images just to read one column: DESIGN.md, defect 7). Images are read
afterwards, row group by row group, for the selected rows only (:meth:`Catalog.image_bytes`).
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
from galaxy_llava.gz2 import QUESTIONS, col, count_col, share, votes_col
from galaxy_llava.layouts import parquet_shards
from galaxy_llava.rules import rule_set

ID_COLUMN = "id_str"
IMAGE_COLUMN = "image"
PATH_COLUMN = "file_loc"
# galaxy-datasets' catalogues: images/<subfolder>/<filename> beside the catalogue.
SPLIT_PATH_COLUMNS = ("subfolder", "filename")
IMAGES_FOLDER = "images"
_IMAGE_SOURCES = ((IMAGE_COLUMN,), (PATH_COLUMN,), SPLIT_PATH_COLUMNS)
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
    """The one line for an image path that leaves the catalogue's folder (or --images-root)."""
    return (f"catalogue image {path} is outside the catalogue's folder {base_dir}; images are "
            "read only from inside it (or --images-root) unless you pass --allow-outside-paths "
            "(a CSV whose file_loc paths are absolute needs it)")


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
                 allow_outside: bool = False, images_root: str | os.PathLike | None = None,
                 extra: tuple[str, ...] = ()) -> Catalog:
    """Open a catalogue (Hub id, parquet file/folder, save_to_disk folder or CSV) and check that
    ``id_str`` and every column the rule set needs are present (or derivable from vote counts)
    and numeric. ``votes`` holds ``id_str``, the rule set's columns, then ``extra``.

    ``allow_outside``: read image paths that point outside the catalogue's folder.
    ``images_root``: the folder relative image paths (``file_loc``, ``subfolder`` +
    ``filename``) are read from, instead of the catalogue's own."""
    ruleset = rule_set(rules)  # an unknown name is a UserError
    root = None
    if images_root is not None:
        root = Path(images_root).expanduser()
        if not root.is_dir():
            raise UserError(f"--images-root {images_root} is not a folder")
        root = root.resolve()
    wanted = _Wanted(tuple(ruleset.columns), tuple(c for c in extra if c not in ruleset.columns),
                     ruleset.reads_counts)
    cat = _open_catalog(source, wanted, hub_config, hub_split, root)
    cat._allow_outside = allow_outside
    if cat.kind == "csv" and not allow_outside:
        cat.check_paths()
    return cat


def _open_catalog(source, needed: "_Wanted", hub_config: str | None, hub_split: str,
                  root: Path | None) -> Catalog:
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                return _from_disk(path, needed, hub_split, root)
            return _from_parquet(path, parquet_shards(path, hub_config, hub_split), needed,
                                 root)
        suffix = path.name.lower()
        if suffix.endswith(".parquet"):
            return _from_parquet(path, [path], needed, root)
        if suffix.endswith((".csv", ".csv.gz")):
            return _from_csv(path, needed, root)
        raise UserError(f"source {text} is not a parquet or CSV file (nor a folder of them)")
    if _HUB_ID.match(text) and not text.lower().endswith((".csv", ".parquet")):
        return _from_hub(text, needed, hub_config, hub_split, root)
    raise UserError(f"source {text} not found: no such file or folder (and not a Hub id like "
                    "mwalmsley/gz2)")


# ---------------------------------------------------------------- columns

_ANSWER_OF = {col(q, a): (q, a) for q, answers in QUESTIONS.items() for a in answers}


class _Wanted:
    """The vote columns to load: the rule set's (``needed``: each stored, or derivable from an
    answer's count and its question's total) and the caller's ``extra`` ones (where present).
    With ``counts`` (rule sets that read counts), a fraction is count / total wherever the
    catalogue has the counts."""

    def __init__(self, needed: tuple[str, ...], extra: tuple[str, ...], counts: bool):
        self.needed, self.extra, self.counts = needed, extra, counts

    def _sources(self, c: str, names: set[str]) -> list[str]:
        """The count and total columns ``c`` is derived from, when both are in ``names``."""
        if c not in _ANSWER_OF:
            return []
        pair = [count_col(*_ANSWER_OF[c]), votes_col(_ANSWER_OF[c][0])]
        return pair if all(p in names for p in pair) else []

    def missing(self, names: set[str]) -> list[str]:
        """Needed columns neither stored nor derivable."""
        return [c for c in self.needed if c not in names and not self._sources(c, names)]

    def read(self, names: set[str]) -> list[str]:
        """The columns of ``names`` to read (id_str aside)."""
        out = []
        for c in (*self.needed, *self.extra):
            if c in names:
                out.append(c)
            if c not in names or (self.counts and c in self.needed):
                out += self._sources(c, names)
        return list(dict.fromkeys(out))

    def finish(self, df: pd.DataFrame) -> pd.DataFrame:
        """``id_str``, the needed then the extra columns (float64): fractions derived from the
        counts where the file lacks them (or everywhere the counts exist, with ``counts``)."""
        names = set(df.columns)
        out = pd.DataFrame({ID_COLUMN: df[ID_COLUMN]})
        for c in (*self.needed, *self.extra):
            stored = df[c].to_numpy(np.float64) if c in names else None
            sources = self._sources(c, names)
            if sources and (stored is None or (self.counts and c in self.needed)):
                derived = share(df[sources[0]].to_numpy(), df[sources[1]].to_numpy())
                stored = derived if stored is None else np.where(np.isnan(derived), stored,
                                                                 derived)
            out[c] = np.full(len(df), np.nan) if stored is None else stored
        for c in CARRIED:  # the user's columns, as they are
            if c in names:
                out[c] = df[c]
        return out


# ---------------------------------------------------------------- validation

def _numeric(t: pa.DataType) -> bool:
    # An all-null shard (a question nobody reached) is typed null; it reads as NaN.
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t) \
        or pa.types.is_decimal(t)


def _check_schema(schema: pa.Schema, needed: _Wanted, where: str) -> list[str]:
    """One-line UserError naming every missing or non-numeric column (the image column(s)
    too); returns the vote columns to read."""
    names = set(schema.names)
    missing = ([ID_COLUMN] if ID_COLUMN not in names else []) + needed.missing(names)
    read = needed.read(names)
    wrong = [f"{c} ({schema.field(c).type})" for c in read
             if not _numeric(schema.field(c).type)]
    if ID_COLUMN in names:
        t = schema.field(ID_COLUMN).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            wrong.append(f"{ID_COLUMN} ({t}, expected text)")
    if not any(all(c in names for c in cols) for cols in _IMAGE_SOURCES):
        missing.append(f"{IMAGE_COLUMN} or {PATH_COLUMN} (or {' + '.join(SPLIT_PATH_COLUMNS)})")
    _raise_bad_columns(where, missing, wrong)
    return read


def _raise_bad_columns(where: str, missing: list[str], wrong: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if wrong:
        problems.append(f"non-numeric column(s) {', '.join(wrong)}")
    if problems:
        raise UserError(f"catalogue {where}: {'; '.join(problems)}")


def _votes_frame(table: pa.Table, read: list[str], needed: _Wanted) -> pd.DataFrame:
    """id_str as text and the vote columns as float64 (nulls become NaN, like pandas)."""
    df = pd.DataFrame({ID_COLUMN: [None if v is None else str(v)
                                   for v in table.column(ID_COLUMN).to_pylist()]})
    for c in read:
        df[c] = table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
    for c in _carried(table.schema):
        df[c] = table.column(c).to_pandas()
    return needed.finish(df)


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


def _image_columns(names: Iterable[str], where: str) -> tuple[str, ...]:
    """The column(s) a row's image comes from: ``image``, ``file_loc`` or ``subfolder`` +
    ``filename``."""
    names = set(names)
    for cols in _IMAGE_SOURCES:
        if all(c in names for c in cols):
            return cols
    raise UserError(f"catalogue {where}: no {IMAGE_COLUMN} or {PATH_COLUMN} column (nor "
                    f"{' + '.join(SPLIT_PATH_COLUMNS)}) to read images from")


def _payloads(columns: list[list[Any]]) -> list[Any]:
    """One payload per row from the image column(s): ``subfolder`` + ``filename`` join into a
    relative path (None where either is missing)."""
    if len(columns) == 1:
        return columns[0]
    return [f"{str(s).strip('/')}/{f}" if s is not None and f is not None else None
            for s, f in zip(*columns)]


def _images_base(where: Path, image_cols: tuple[str, ...], root: Path | None) -> Path:
    """Where relative image paths resolve: ``--images-root``, else galaxy-datasets' ``images/``
    beside a subfolder/filename catalogue, else the catalogue's folder."""
    if root is not None:
        return root
    folder = where if where.is_dir() else where.parent
    if image_cols == SPLIT_PATH_COLUMNS and (folder / IMAGES_FOLDER).is_dir():
        return folder / IMAGES_FOLDER
    return folder


# ---------------------------------------------------------------- parquet

def _from_parquet(where: Path, files: list[Path], needed: _Wanted,
                  root: Path | None = None) -> Catalog:
    frames, groups, starts, image_cols, total = [], [], [], None, 0
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read parquet file {f}: {e}") from None
        schema = pf.schema_arrow
        read = _check_schema(schema, needed, str(f))
        cols = _image_columns(schema.names, str(f))
        if image_cols not in (None, cols):
            raise UserError(f"parquet shards under {where} disagree on the image column")
        image_cols = cols
        # Only id_str and the vote columns are read here; the image column stays on disk.
        frames.append(_votes_frame(pf.read(columns=[ID_COLUMN, *read, *_carried(schema)]), read,
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
            table = pf.read_row_group(rg, columns=list(image_cols))
            take = pa.array(mine - starts_arr[g])
            values = _payloads([table.column(c).take(take).to_pylist() for c in image_cols])
            yield from zip(mine.tolist(), values)

    base = _images_base(where, image_cols or (), root)
    return Catalog(str(where), "parquet", votes, fetch, base_dir=base)


# ---------------------------------------------------------------- datasets (Hub, save_to_disk)

def _from_dataset(ds: Any, source: str, kind: str, needed: _Wanted,
                  base_dir: Path | None) -> Catalog:
    schema = ds.data.schema
    read = _check_schema(schema, needed, source)
    image_cols = _image_columns(schema.names, source)
    # The arrow format hands back raw columns: no Image feature is decoded, no row iterated.
    table = ds.select_columns([ID_COLUMN, *read, *_carried(schema)]).with_format("arrow")[:]
    images = ds.select_columns(list(image_cols)).with_format("arrow")

    def fetch(rows: list[int]) -> Iterator[tuple[int, Any]]:
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            part = images[chunk]
            yield from zip(chunk, _payloads([part.column(c).to_pylist() for c in image_cols]))

    return Catalog(source, kind, _votes_frame(table, read, needed), fetch, base_dir=base_dir)


def _from_disk(folder: Path, needed: _Wanted, split: str, root: Path | None = None) -> Catalog:
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
    return _from_dataset(ds, str(folder), "save_to_disk", needed, root or folder)


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


def _from_hub(repo: str, needed: _Wanted, config: str | None, split: str,
              root: Path | None = None) -> Catalog:
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
    return _from_dataset(ds, repo, "hub", needed, root)


# ---------------------------------------------------------------- CSV

def _from_csv(path: Path, needed: _Wanted, root: Path | None = None) -> Catalog:
    try:
        header = set(pd.read_csv(path, nrows=0).columns)
        image_cols = (PATH_COLUMN,) if PATH_COLUMN in header or not all(
            c in header for c in SPLIT_PATH_COLUMNS) else SPLIT_PATH_COLUMNS
        missing = ([ID_COLUMN] if ID_COLUMN not in header else []) + needed.missing(header) \
            + [c for c in image_cols if c not in header]
        _raise_bad_columns(str(path), missing, [])
        read = needed.read(header)
        # Read only what selection needs; ids and paths stay text (GZ2 ids overflow float).
        df = pd.read_csv(path, usecols=[ID_COLUMN, *image_cols, *read,
                                        *[c for c in CARRIED if c in header]],
                         dtype={ID_COLUMN: str, **{c: str for c in image_cols}})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"cannot read CSV {path}: {str(e).splitlines()[0]}") from None
    wrong = [f"{c} ({df[c].dtype})" for c in read
             if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]
    _raise_bad_columns(str(path), [], wrong)
    votes = needed.finish(df.reset_index(drop=True))
    votes[ID_COLUMN] = votes[ID_COLUMN].where(votes[ID_COLUMN].notna(), None)
    paths = _payloads([[v if isinstance(v, str) else None for v in df[c]] for c in image_cols])

    def fetch(rows: list[int]) -> Iterator[tuple[int, Any]]:
        for r in rows:
            yield r, paths[r]

    return Catalog(str(path), "csv", votes, fetch, base_dir=_images_base(path, image_cols, root))
