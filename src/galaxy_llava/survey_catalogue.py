"""A morphology catalogue for many images: one parquet row per galaxy, written part by part.

``galaxy-llava catalogue --model RUN --out OUT (--images DIR... | --source CATALOGUE)`` scores
every caption of the grammar for each input image (:mod:`galaxy_llava.scoring`): the most probable
caption, each attribute's predicted value and marginal probabilities, and the entropy. The row's
``caption`` is that most probable caption (``--caption grammar``, the default), beam search's
exactly as ``describe`` gives it (``--caption both``), or beam search's alone without scores
(``--caption beam``, or ``--no-scores``).

Inputs, in a fixed order (:func:`galaxy_llava.imagefiles.gather_images`):

* ``--images DIR|LIST|FILE ...``: each folder searched recursively for images (JPEG, PNG, TIFF
  and FITS cutouts, made RGB by :mod:`galaxy_llava.fitscutouts`; hidden entries skipped), sorted
  by their path inside the folder; a prepared dataset contributes only its ``images/`` folder,
  so its ``preview.png`` is never catalogued. A ``.csv``/``.parquet`` path list (column
  ``path``, ``file_loc`` or ``image``, or ``path_<band>`` per band; optional ``id``/``id_str``)
  gives its rows, relative paths resolved against the list's folder, and its other columns
  (ra, dec, ...) come through to the rows. The id is the dataset's ``id_str`` or the list's
  id, else the file name without its suffix; stems that collide become the path relative to
  their folder, and ids that still collide (or repeat in a list) are refused in one line. A
  list's paths that leave its folder need ``--allow-outside-paths``.
* ``--source CATALOGUE``: a GZ2-schema catalogue (:func:`galaxy_llava.gz2_catalog.load_catalog`:
  parquet shards, ``save_to_disk`` folder, CSV with ``file_loc``, Hub id); only ``id_str``, the
  vote columns and ra, dec, dataset_name (carried to the rows) are held in memory, images are
  read a batch at a time and decoded one by one. The id is ``id_str``; ``image`` is the row.

An input that cannot be read (no image HDU, zero-size, blank, truncated, empty...) is skipped:
its part records it (image, id, reason) and ``OUT/_failures.csv`` lists every finished part's;
the command says how many and exits with :data:`~galaxy_llava.errors.EXIT_SKIPPED`. With
``strict`` the first one stops the run (header problems before any model loads).

Output: ``OUT/_manifest.json`` (written first: the inputs' identity, the settings and each
part's stamp) and ``OUT/part-XXXXX.parquet``, part ``i`` holding inputs
``[i * part_size, (i + 1) * part_size)`` in input order (less the skipped ones), each written
atomically. The leading underscore makes ``pandas.read_parquet("OUT")`` and
``pyarrow.dataset.dataset("OUT")`` skip the manifest and the failures table, so both read the
folder as one table, as does ``datasets.load_dataset("parquet", data_files="OUT/*.parquet")``.
Each file's schema metadata (``galaxy_llava``) records the model, prompt, rules, decoding
settings, package version and the inputs it skipped. Yes/no attributes are boolean columns.

Scale-out: part ``i`` belongs to process ``i % world == rank``, where (rank, world) comes from
``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch) and ``--shard I/N`` (a job array), combined
as rank ``I * WORLD_SIZE + RANK`` of ``N * WORLD_SIZE``. A part whose file exists with its stamp
(a hash of the settings and of that part's own inputs) is skipped, so a killed job loses at most
the parts it was writing, and a retry after a failure with other inputs or settings continues an
unfinished catalogue, keeping the parts whose inputs did not change (a finished one needs
``--overwrite``, which also keeps them). Batches never straddle parts: with ``part_size`` a
multiple of ``batch_size`` (the defaults) the batches, and so the captions, are exactly
``describe``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import __version__
from galaxy_llava.survey_catalogue_folder import (COMMAND, LEGACY_MANIFEST, MANIFEST,
                                           META_KEY, claim_catalogue, fingerprint, part_failures,
                                           part_fingerprint, part_name, part_stamps,
                                           read_manifest, remove_stale, write_failures)
from galaxy_llava.checks import number
from galaxy_llava.config import DECODING
from galaxy_llava.errors import UserError
from galaxy_llava.fitscutouts import FitsOptions
from galaxy_llava.imagefiles import gather_images, image_label, refuse_duplicate_ids
from galaxy_llava.io import atomic_path, write_json
from galaxy_llava.models.folders import abs_if_local, is_local, read_prompt, run_kind
from galaxy_llava.models.preflight import check_generation
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import load_image, unreadable
from galaxy_llava.rules import rule_set
from galaxy_llava.scoring import BOOLEAN, score_column_names, score_columns

CAPTIONS = ("grammar", "beam", "both")
# The grammar's most probable caption by default: exact-match at least as often as beam search on
# the demo, always inside the grammar, and one tree-scoring forward per batch (README, BENCHMARKS).
DEFAULT_CAPTION = "grammar"


# ----------------------------------------------------------------- settings

def caption_mode(caption: str | None, scores: bool = True) -> str:
    """``--caption`` resolved against ``--no-scores``: beam search alone without scores, else
    the default; grammar and both need the scores."""
    if caption is None:
        return DEFAULT_CAPTION if scores else "beam"
    if caption not in CAPTIONS:
        raise UserError(f"--caption must be one of {', '.join(CAPTIONS)} (got {caption!r})")
    if caption != "beam" and not scores:
        raise UserError(f"--caption {caption} needs the grammar scores; drop --no-scores or "
                        "use --caption beam")
    return caption


def caption_batch(net, processor, images: list, prompt: str, caption: str, rules: str,
                  batch_size: int, num_beams: int, max_new_tokens: int):
    """``(captions, scores)`` of one batch of images in ``caption`` mode: the grammar's
    most probable captions (one scoring forward, no beam search), or beam search's exactly as
    ``describe`` gives them; scores are None for ``beam``."""
    from galaxy_llava.generate import describe_images
    from galaxy_llava.scoring import grammar_scores

    found = None if caption == "beam" else grammar_scores(net, processor, images, rules, prompt)
    if caption == "grammar":
        return [s.best for s in found], found
    return describe_images(net, processor, images, prompt, batch_size=batch_size,
                           num_beams=num_beams, max_new_tokens=max_new_tokens,
                           progress=False), found


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)`` with ``0 <= I < N``; None is ``(0, 1)``."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard must be I/N, such as 0/4 (got {text!r})")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise UserError(f"--shard {text}: I must be in [0, N) and N at least 1")
    return i, n


def process_slot(shard: tuple[int, int], env: dict | None = None) -> tuple[int, int]:
    """(rank, world) of this process: ``--shard`` combined with torchrun's/accelerate's
    ``RANK`` and ``WORLD_SIZE``."""
    env = os.environ if env is None else env
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    except ValueError:
        raise UserError(f"RANK={env.get('RANK')!r} and WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                        "must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
    return shard[0] * world + rank, shard[1] * world


# ----------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """What to catalogue: ``ids`` and ``images`` (paths, band-file tuples, or catalogue rows) in
    input order, ``keys`` (what each item's part stamp covers), ``columns`` (the user's own,
    one row per item) and ``identity``, what a manifest records of them."""

    ids: list
    images: list
    identity: dict
    keys: list
    columns: Any = None
    catalog: Any = None  # the open Catalog for --source


def _digest(items: Sequence) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(json.dumps(x).encode() + b"\n")
    return h.hexdigest()[:16]


def _size(path: str) -> int:
    return os.stat(path).st_size if os.path.exists(path) else -1


def folder_inputs(images: Sequence[str | os.PathLike], allow_outside: bool = False,
                  bands: tuple[str, ...] = ()) -> Inputs:
    """The images of ``--images`` entries, in order, with unique ids and the path lists' own
    columns (:func:`galaxy_llava.imagefiles.gather_images`)."""
    found = gather_images(images, allow_outside, bands)
    keys = [[image_label(x), [_size(f) for f in x] if isinstance(x, tuple) else _size(x), i]
            for x, i in zip(found.images, found.ids)]
    identity = {"images": [os.path.abspath(d) for d in images], "n": len(found.images),
                "files": _digest(keys)}
    return Inputs(found.ids, found.images, identity, keys, found.columns)


def source_inputs(source: str, rules: str, allow_outside: bool = False) -> Inputs:
    """The rows of a GZ2-schema catalogue (ids and vote columns in memory, images on demand)."""
    from galaxy_llava.gz2_catalog import ID_COLUMN, load_catalog

    cat = load_catalog(source, rules=rules, allow_outside=allow_outside)
    if len(cat) == 0:
        raise UserError(f"--source {source}: the catalogue has no rows")
    ids = cat.votes[ID_COLUMN].tolist()
    refuse_duplicate_ids(ids, f"--source {source}: ids ({ID_COLUMN}) must be unique; "
                         "repeated", "row")
    where = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() \
        else str(source)
    return Inputs(ids, list(range(len(cat))),
                  {"source": where, "n": len(cat), "ids": _digest(ids)},
                  [[row, i] for row, i in enumerate(ids)], cat.carried, cat)


# ----------------------------------------------------------------- rows

def _schema(scores: bool, p_columns: list[str], image_is_path: bool):
    import pyarrow as pa

    columns = [("id", pa.string()), ("image", pa.string() if image_is_path else pa.int64()),
               ("caption", pa.string())]
    if scores:
        columns += [("best_caption", pa.string())] + [
            (a, pa.bool_() if a in BOOLEAN else pa.string()) for a in ATTRIBUTES]
        columns += [(c, pa.float64()) for c in p_columns] + [("entropy", pa.float64())]
    return pa.schema(columns)


def user_columns(columns, ours) -> tuple[Any, Any]:
    """The user's columns as a frame renamed clear of the catalogue's own (a clash such as
    ``caption`` or ``type`` becomes ``input_caption``), and their arrow schema."""
    import pyarrow as pa

    if columns is None or not len(columns.columns):
        return None, pa.schema([])
    taken = set(ours.names)
    renamed = columns.rename(columns=lambda c: f"input_{c}" if str(c) in taken else str(c))
    return renamed, pa.Schema.from_pandas(renamed, preserve_index=False).remove_metadata()


def write_part(path: Path, rows: list[dict], schema, provenance: dict, extra=None) -> None:
    """One part file, written atomically, its provenance in the schema metadata; ``extra``:
    the user's columns of its rows (a pandas frame and its schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    if extra is not None and extra[0] is not None:
        theirs = pa.Table.from_pandas(extra[0], schema=extra[1], preserve_index=False)
        for name in theirs.column_names:
            table = table.append_column(theirs.schema.field(name), theirs.column(name))
    table = table.replace_schema_metadata({META_KEY: json.dumps(provenance).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ----------------------------------------------------------------- the command

def build_catalogue(model: str, out: str | os.PathLike, *, images: Sequence[str] | None = None,
                    source: str | None = None, rules: str = "reference",
                    batch_size: int = DECODING.batch_size, num_beams: int = DECODING.num_beams,
                    max_new_tokens: int = DECODING.max_new_tokens, scores: bool = True,
                    shard: str | None = None, part_size: int = 256, overwrite: bool = False,
                    allow_outside_paths: bool = False, device=None, progress: bool = True,
                    fits=None, strict: bool = False, caption: str | None = None) -> dict:
    """Write this process's parts of the catalogue of ``images`` folders or a ``source``
    catalogue into ``out`` (see the module's docstring); returns a summary.

    Everything is checked before anything is written or a model loads: settings, the inputs,
    ``out``, each image's header. An input that cannot be read is skipped and recorded in the
    part and in ``OUT/_failures.csv``; with ``strict`` it stops the run instead. ``caption``:
    grammar, beam or both (:func:`caption_mode`)."""
    out = Path(out)
    fits = fits or FitsOptions()
    number("--part-size", part_size, 1, integer=True)
    slot, slots = process_slot(parse_shard(shard))
    rule_set(rules)  # an unknown name is one line
    caption = caption_mode(caption, scores)
    scores = caption != "beam"
    if (images is None) == (source is None):
        raise UserError("pass either --images DIR ... or --source CATALOGUE")
    check_generation(model, batch_size, num_beams, max_new_tokens)
    if is_local(str(model)) and run_kind(Path(model).expanduser()) is None:
        raise UserError(f"--model {model}: not a galaxy-llava run or model folder"
                        if Path(model).expanduser().exists() else f"--model {model} not found")
    for d in images or []:  # a missing input is named before anything is listed
        if not Path(d).exists():
            raise UserError(f"--images {d}: not found")
    inputs = (folder_inputs(images, allow_outside_paths, fits.band_names) if images is not None
              else source_inputs(source, rules, allow_outside_paths))
    model_id = abs_if_local(str(model))
    settings = {"model": model_id, "prompt": read_prompt(model) if Path(model).is_dir() else None,
                "rules": rules if scores else None, "scores": scores, "batch_size": batch_size,
                "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                "part_size": part_size, "caption": caption, "version": __version__}
    if images is not None:  # how FITS files become pictures is part of what a row says
        settings["fits"] = fits.to_dict()
    identity = {**inputs.identity, **settings}
    status = claim_catalogue(out, identity, overwrite)
    stamps = part_stamps(inputs, settings, part_size)
    n_parts = len(stamps)
    mine = [i for i in range(n_parts) if i % slots == slot]
    done = [i for i in mine if status != "new"
            and part_fingerprint(out / part_name(i)) == stamps[i]]
    todo = [i for i in mine if i not in done]
    bad: dict[int, str] = {}
    if inputs.catalog is None:  # unreadable headers are found now, before any model loads
        bad = unreadable(inputs.images, (k for i in todo for k in range(
            i * part_size, min((i + 1) * part_size, len(inputs.ids)))), fits, strict)
    manifest = {"command": COMMAND, "identity": identity, "fingerprint": fingerprint(identity),
                "parts": n_parts, "items": len(inputs.ids), "stamps": stamps}
    if read_manifest(out) != manifest or (out / LEGACY_MANIFEST).exists():
        write_json(out / MANIFEST, manifest)
    remove_stale(out, stamps, mine)
    summary = {"out": str(out), "items": len(inputs.ids), "parts": n_parts, "mine": len(mine),
               "skipped": len(done), "written": 0, "kept": len(done) if status == "continue"
               else None}
    if todo:
        _write_parts(model, out, inputs, todo, part_size, settings, stamps, rules, batch_size,
                     num_beams, max_new_tokens, caption, device, progress, fits, strict, bad)
        summary["written"] = len(todo)
    summary["complete"] = sum(part_fingerprint(out / part_name(i)) == stamps[i]
                              for i in range(n_parts))
    summary["failed"] = sum(len(part_failures(out / part_name(i))) for i in mine)
    summary["failed_total"] = write_failures(out, stamps)
    return summary


def _device(device):
    if device is not None:
        return device
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None


def _batch_images(inputs: Inputs, items: list, fits) -> list:
    """Each of ``items`` decoded as RGB, or the UserError saying why it cannot be (paths, or
    catalogue rows read together and decoded one by one), in order."""
    if inputs.catalog is None:
        out = []
        for p in items:
            try:
                out.append(load_image(p, options=fits))
            except UserError as e:
                out.append(e)
        return out
    from galaxy_llava.gz2_catalog import ID_COLUMN, ImageError, decode_image

    payload = {row: (data, err) for row, data, err in inputs.catalog.image_bytes(items)}
    out = []
    for row in items:
        data, err = payload[row]
        try:
            if err:
                raise ImageError(err)
            out.append(decode_image(data).convert("RGB"))
        except ImageError as e:
            out.append(UserError(f"--source row {row} (galaxy "
                                 f"{inputs.catalog.votes[ID_COLUMN].iat[row]}): {e}"))
    return out


def _write_parts(model, out, inputs, todo, part_size, settings, stamps, rules, batch_size,
                 num_beams, max_new_tokens, caption, device, progress, fits, strict, bad) -> None:
    from tqdm.auto import tqdm

    from galaxy_llava.models.loading import load_for_inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the default prompt is in the provenance
        net, processor, prompt = load_for_inference(model, device=_device(device))
    by_caption, p_columns = score_column_names(rules)
    scores = caption != "beam"
    schema = _schema(scores, p_columns, inputs.catalog is None)
    theirs, their_schema = user_columns(inputs.columns, schema)
    provenance = {**settings, "prompt": prompt, "rules": rules if scores else None,
                  "decoding": {"num_beams": num_beams, "max_new_tokens": max_new_tokens,
                               "batch_size": batch_size, "do_sample": False},
                  "package": f"galaxy-llava {__version__}"}
    total = sum(len(inputs.ids[i * part_size:(i + 1) * part_size]) for i in todo)
    with tqdm(total=total, desc="catalogue", unit="img", disable=not progress) as bar:
        for i in todo:
            lo, hi = i * part_size, min((i + 1) * part_size, len(inputs.ids))
            rows, kept, failures = [], [], []
            for start in range(lo, hi, batch_size):
                ks = range(start, min(start + batch_size, hi))
                todo_ks = [k for k in ks if k not in bad]
                decoded = dict(zip(todo_ks, _batch_images(
                    inputs, [inputs.images[k] for k in todo_ks], fits)))
                for k in ks:
                    problem = bad.get(k) or decoded[k]
                    if isinstance(problem, (str, UserError)):
                        if strict:
                            raise problem if isinstance(problem, UserError) else UserError(problem)
                        failures.append([image_label(inputs.images[k]), str(inputs.ids[k]),
                                         str(problem)])
                good = [k for k in ks if not isinstance(decoded.get(k, ""), (str, UserError))]
                batch = [decoded[k] for k in good]
                bar.update(len(ks))
                if not batch:
                    continue
                texts, found = caption_batch(net, processor, batch, prompt, caption, rules,
                                             batch_size, num_beams, max_new_tokens)
                for n, (k, text) in enumerate(zip(good, texts)):
                    row = {"id": None if inputs.ids[k] is None else str(inputs.ids[k]),
                           "image": (image_label(inputs.images[k]) if inputs.catalog is None
                                     else inputs.images[k]), "caption": text}
                    if found is not None:
                        row.update(score_columns(found[n], by_caption))
                    rows.append(row)
                    kept.append(k)
            extra = None if theirs is None else (theirs.iloc[kept].reset_index(drop=True),
                                                  their_schema)
            write_part(out / part_name(i), rows, schema,
                       {**provenance, "part": i, "fingerprint": stamps[i],
                        "failures": failures}, extra)
