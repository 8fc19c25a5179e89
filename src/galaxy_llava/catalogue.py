"""A morphology catalogue for many images: one parquet row per galaxy, written part by part.

``galaxy-llava catalogue --model RUN --out OUT (--images DIR... | --source CATALOGUE)`` scores
every caption of the grammar for each input image (:mod:`galaxy_llava.scoring`): the most probable
caption, each attribute's predicted value and marginal probabilities, and the entropy. The row's
``caption`` is that most probable caption (``--caption grammar``, the default), beam search's
exactly as ``describe`` gives it (``--caption both``), or beam search's alone without scores
(``--caption beam``, or ``--no-scores``).

Inputs, in a fixed order:

* ``--images DIR|LIST|FILE ...``: each folder searched recursively for images (``.jpg``,
  ``.jpeg``, ``.png`` and FITS cutouts ``.fits``/``.fits.gz``, stretched to RGB; hidden entries
  skipped), sorted by their path inside the folder; a prepared dataset contributes only its
  ``images/`` folder, so its ``preview.png`` is never catalogued
  (:func:`galaxy_llava.imagefiles.find_images`). A ``.csv``/``.parquet`` path list (column
  ``path``, ``file_loc`` or ``image``; optional ``id``/``id_str``) gives its rows, relative paths
  resolved against the list's folder. The id is the list's id, else the file name without its
  suffix. A list's paths that leave its folder need ``--allow-outside-paths``.
* ``--source CATALOGUE``: a GZ2-schema catalogue (:func:`galaxy_llava.catalog.load_catalog`:
  parquet shards, ``save_to_disk`` folder, CSV with ``file_loc``, Hub id); only ``id_str`` and
  the vote columns are held in memory, images are read a batch at a time and decoded one by one.
  The id is ``id_str``; ``image`` is the catalogue row.

Output: ``OUT/manifest.json`` (written first: the inputs' identity and the settings) and
``OUT/part-XXXXX.parquet``, part ``i`` holding inputs ``[i * part_size, (i + 1) * part_size)``
in input order, each written atomically. ``datasets.load_dataset("parquet",
data_files="OUT/*.parquet")`` reads them as one dataset. Each file's schema metadata
(``galaxy_llava``) records the model, prompt, rules, decoding settings and package version.

Scale-out: part ``i`` belongs to process ``i % world == rank``, where (rank, world) comes from
``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch) and ``--shard I/N`` (a job array), combined
as rank ``I * WORLD_SIZE + RANK`` of ``N * WORLD_SIZE``. A part whose file exists with the
manifest's fingerprint is skipped, so a killed job loses at most the parts it was writing. Batches
never straddle parts: with ``part_size`` a multiple of ``batch_size`` (the defaults) the batches,
and so the captions, are exactly ``describe``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import __version__, outputs
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, read_json_object, temp_pattern, write_json
from galaxy_llava.morphology import ATTRIBUTES, value_label

MANIFEST = "manifest.json"
COMMAND = "catalogue"
META_KEY = b"galaxy_llava"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_STALE_TEMP_S = 60  # a manifest temporary older than this belongs to no live process
CAPTIONS = ("grammar", "beam", "both")
# The grammar's most probable caption by default: exact-match at least as often as beam search on
# the demo, always inside the grammar, and one tree-scoring forward per batch (README, BENCHMARKS).
DEFAULT_CAPTION = "grammar"


def part_name(i: int) -> str:
    """The file name of part ``i``."""
    return f"part-{i:05d}.parquet"


def value_column(attribute: str, value: str) -> str:
    """``p_<attribute>_<value>`` with every run of non-alphanumerics in the value as ``_``
    (``p_shape_in_between``, ``p_type_edge_on_disk``)."""
    return f"p_{attribute}_{re.sub(r'[^0-9a-zA-Z]+', '_', value).strip('_').lower()}"


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
    """What to catalogue: ``ids`` and ``images`` (paths, or catalogue rows) in input order, and
    ``identity``, what a manifest records of them."""

    ids: list
    images: list
    identity: dict
    catalog: Any = None  # the open Catalog for --source


def _digest(items: Sequence) -> str:
    h = hashlib.sha256()
    for x in items:
        h.update(json.dumps(x).encode() + b"\n")
    return h.hexdigest()[:16]


def folder_inputs(images: Sequence[str | os.PathLike], allow_outside: bool = False) -> Inputs:
    """The images of ``--images`` entries, in order: a folder's images
    (:func:`galaxy_llava.imagefiles.find_images`), a CSV/parquet path list's
    (:func:`galaxy_llava.imagefiles.read_path_list`), or one image file. The id is the prepared
    dataset's ``id_str`` or the path list's id column, else the file name without its suffix."""
    from galaxy_llava.imagefiles import (LIST_SUFFIXES, find_images, image_stem, is_image_name,
                                         read_path_list)

    paths: list[str] = []
    ids: list[str] = []
    for entry in images:
        p = Path(entry)
        if p.is_dir():
            found = [os.path.abspath(f) for f in find_images(p)]
            known = _dataset_ids(p)
            paths += found
            ids += [known.get(os.path.realpath(f)) or image_stem(f) for f in found]
        elif p.is_file() and p.name.lower().endswith(LIST_SUFFIXES):
            listed = read_path_list(p, allow_outside)
            paths += listed.paths
            ids += listed.ids
        elif p.is_file() and is_image_name(p.name):
            paths.append(os.path.abspath(p))
            ids.append(image_stem(p))
        else:
            raise UserError(f"--images {entry}: not a folder, an image or a .csv/.parquet list "
                            "of paths" if p.exists() else f"--images {entry}: not found")
    sizes = [os.stat(f).st_size if os.path.exists(f) else -1 for f in paths]
    identity = {"images": [os.path.abspath(d) for d in images], "n": len(paths),
                "files": _digest(list(zip(paths, sizes, ids)))}
    return Inputs(ids, paths, identity)


def _dataset_ids(folder: Path) -> dict[str, str]:
    """Real image path -> ``id_str`` of the prepared dataset ``folder`` is, or whose
    ``images/`` it is (empty for any other folder, or records without ids)."""
    from galaxy_llava.imagefiles import is_prepared_dataset

    for root in (folder, folder.parent if folder.name == "images" else None):
        if root is not None and is_prepared_dataset(root) and (root / "dataset.jsonl").is_file():
            from galaxy_llava.records import load_records

            return {os.path.realpath(r["image"]): str(r["id_str"])
                    for r in load_records(root, allow_outside=True)
                    if r.get("id_str") is not None}
    return {}


def source_inputs(source: str, rules: str, allow_outside: bool = False) -> Inputs:
    """The rows of a GZ2-schema catalogue (ids and vote columns in memory, images on demand)."""
    from galaxy_llava.catalog import ID_COLUMN, load_catalog

    cat = load_catalog(source, rules=rules, allow_outside=allow_outside)
    if len(cat) == 0:
        raise UserError(f"--source {source}: the catalogue has no rows")
    ids = cat.votes[ID_COLUMN].tolist()
    where = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() \
        else str(source)
    return Inputs(ids, list(range(len(cat))),
                  {"source": where, "n": len(cat), "ids": _digest(ids)}, cat)


# ----------------------------------------------------------------- the output folder

def _read_manifest(out: Path) -> dict:
    return read_json_object(out / MANIFEST)


def fingerprint(identity: dict) -> str:
    """A short hash of a catalogue's identity, stamped on each part."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def claim_catalogue(out: Path, identity: dict, overwrite: bool) -> str:
    """The outputs contract for OUT: ``"new"``, ``"same"`` (a re-run or another shard) or
    ``"replace"`` (different inputs or settings, with ``overwrite``). Refuses, in one line,
    anything else: another kind of output, a prepared dataset, another catalogue without
    ``--overwrite``. Changes nothing."""
    found = outputs.check_kind(out, "morphology")  # refuses datasets and everything else
    if found in (None, "empty"):
        return "new"
    old = _read_manifest(out)
    diffs = outputs.differences(old.get("identity") or {}, identity)
    if not diffs:
        return "same"
    if overwrite:
        return "replace"
    raise UserError(f"--out {out} holds a different catalogue: {'; '.join(diffs[:3])}; pass "
                    "--overwrite to replace it, or choose another --out")


def part_fingerprint(path: Path) -> str | None:
    """The fingerprint stamped on a part file (None when unreadable or unstamped)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY]).get("fingerprint")
    except Exception:  # a damaged or foreign file: treat as missing, it will be rewritten
        return None


def _remove_stale(out: Path, stamp: str, parts: Sequence[int]) -> None:
    """Remove the leftovers of interrupted writes of ``parts`` (this process's), manifest
    temporaries older than a minute, and, on replacement, parts of another catalogue."""
    mine = [temp_pattern(part_name(i)) for i in parts]
    manifest_tmp = temp_pattern(MANIFEST)
    now = time.time()
    for e in os.scandir(out):
        path = Path(e.path)
        if any(p.match(e.name) for p in mine):
            outputs.remove(path)
        elif manifest_tmp.match(e.name) and now - e.stat().st_mtime > _STALE_TEMP_S:
            outputs.remove(path)
        elif _PART.match(e.name) and part_fingerprint(path) != stamp:
            outputs.remove(path)


# ----------------------------------------------------------------- rows

def _columns(rules: str) -> tuple[dict, list[str]]:
    """(caption -> Morphology of the rule set, the ``p_`` columns in order)."""
    from galaxy_llava.rules import rule_set
    from galaxy_llava.scoring import posterior_summary

    candidates = rule_set(rules).reachable()
    values = posterior_summary(candidates, [0.0] * len(candidates)).marginals
    return ({m.caption(): m for m in candidates},
            [value_column(a, v) for a in ATTRIBUTES for v in values[a]])


def score_columns(scores, by_caption: dict) -> dict:
    """The scored columns of one row: ``best_caption``, each attribute's predicted value (that
    of the best caption), ``p_<attribute>_<value>`` and ``entropy``."""
    best = by_caption[scores.best]
    row: dict[str, Any] = {"best_caption": scores.best}
    for a in ATTRIBUTES:
        row[a] = value_label(best, a)
    for a in ATTRIBUTES:
        for v, p in scores.marginals[a].items():
            row[value_column(a, v)] = p
    row["entropy"] = scores.entropy
    return row


def _schema(scores: bool, p_columns: list[str], image_is_path: bool):
    import pyarrow as pa

    fields = [("id", pa.string()), ("image", pa.string() if image_is_path else pa.int64()),
              ("caption", pa.string())]
    if scores:
        fields += [("best_caption", pa.string())] + [(a, pa.string()) for a in ATTRIBUTES]
        fields += [(c, pa.float64()) for c in p_columns] + [("entropy", pa.float64())]
    return pa.schema(fields)


def write_part(path: Path, rows: list[dict], schema, provenance: dict) -> None:
    """One part file, written atomically, its provenance in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(
        {META_KEY: json.dumps(provenance).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ----------------------------------------------------------------- the command

def build_catalogue(model: str, out: str | os.PathLike, images: Sequence[str] | None = None,
                    source: str | None = None, rules: str = "reference", batch_size: int = 16,
                    num_beams: int = 3, max_new_tokens: int = 40, scores: bool = True,
                    shard: str | None = None, part_size: int = 256, overwrite: bool = False,
                    allow_outside_paths: bool = False, device=None, progress: bool = True,
                    caption: str | None = None) -> dict:
    """Write this process's parts of the catalogue of ``images`` folders or a ``source``
    catalogue into ``out`` (see the module's docstring); returns a summary.

    Everything is checked before anything is written or a model loads: settings, the inputs,
    ``out``. ``caption``: grammar, beam or both (:func:`caption_mode`)."""
    from galaxy_llava.checks import check_generation, number
    from galaxy_llava.models.folders import abs_if_local, is_local, read_prompt, run_kind
    from galaxy_llava.rules import rule_set

    out = Path(out)
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
    inputs = (folder_inputs(images, allow_outside_paths) if images is not None
              else source_inputs(source, rules, allow_outside_paths))
    model_id = abs_if_local(str(model))
    settings = {"model": model_id, "prompt": read_prompt(model) if Path(model).is_dir() else None,
                "rules": rules if scores else None, "scores": scores, "batch_size": batch_size,
                "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                "part_size": part_size, "caption": caption, "version": __version__}
    identity = {**inputs.identity, **settings}
    status = claim_catalogue(out, identity, overwrite)
    stamp = fingerprint(identity)
    n_parts = -(-len(inputs.ids) // part_size)
    mine = [i for i in range(n_parts) if i % slots == slot]
    done = [i for i in mine if status == "same" and part_fingerprint(out / part_name(i)) == stamp]
    todo = [i for i in mine if i not in done]
    if inputs.catalog is None:  # a stray text file fails now, by name, before any model loads
        from galaxy_llava.records import load_image

        for i in todo:
            for p in inputs.images[i * part_size:(i + 1) * part_size]:
                load_image(p, decode=False)
    if _read_manifest(out).get("identity") != identity:
        write_json(out / MANIFEST, {"command": COMMAND, "identity": identity,
                                    "fingerprint": stamp, "parts": n_parts,
                                    "items": len(inputs.ids)})
    _remove_stale(out, stamp, mine)
    summary = {"out": str(out), "items": len(inputs.ids), "parts": n_parts, "mine": len(mine),
               "skipped": len(done), "written": 0}
    if todo:
        _write_parts(model, out, inputs, todo, part_size, settings, stamp, rules, batch_size,
                     num_beams, max_new_tokens, caption, device, progress)
        summary["written"] = len(todo)
    summary["complete"] = sum(part_fingerprint(out / part_name(i)) == stamp
                              for i in range(n_parts))
    return summary


def _device(device):
    if device is not None:
        return device
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None


def _batch_images(inputs: Inputs, items: list):
    """Decoded RGB images of ``items`` (paths, or catalogue rows read together, decoded one by
    one), in order."""
    from galaxy_llava.records import load_image

    if inputs.catalog is None:
        return [load_image(p) for p in items]
    from galaxy_llava.catalog import ID_COLUMN, ImageError, decode_image

    payload = {row: (data, err) for row, data, err in inputs.catalog.image_bytes(items)}
    out = []
    for row in items:
        data, err = payload[row]
        try:
            if err:
                raise ImageError(err)
            out.append(decode_image(data).convert("RGB"))
        except ImageError as e:
            raise UserError(f"--source row {row} (galaxy "
                            f"{inputs.catalog.votes[ID_COLUMN].iat[row]}): {e}") from None
    return out


def _write_parts(model, out, inputs, todo, part_size, settings, stamp, rules, batch_size,
                 num_beams, max_new_tokens, caption, device, progress) -> None:
    import warnings

    from tqdm.auto import tqdm

    from galaxy_llava.models.loading import load_for_inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the default prompt is in the provenance
        net, processor, prompt = load_for_inference(model, device=_device(device))
    by_caption, p_columns = _columns(rules)
    scores = caption != "beam"
    schema = _schema(scores, p_columns, inputs.catalog is None)
    provenance = {**settings, "prompt": prompt, "rules": rules if scores else None,
                  "decoding": {"num_beams": num_beams, "max_new_tokens": max_new_tokens,
                               "batch_size": batch_size, "do_sample": False},
                  "package": f"galaxy-llava {__version__}", "fingerprint": stamp}
    total = sum(len(inputs.ids[i * part_size:(i + 1) * part_size]) for i in todo)
    with tqdm(total=total, desc="catalogue", unit="img", disable=not progress) as bar:
        for i in todo:
            lo, hi = i * part_size, min((i + 1) * part_size, len(inputs.ids))
            rows = []
            for start in range(lo, hi, batch_size):
                items = inputs.images[start:min(start + batch_size, hi)]
                batch = _batch_images(inputs, items)
                texts, found = caption_batch(net, processor, batch, prompt, caption, rules,
                                             batch_size, num_beams, max_new_tokens)
                for k, text in enumerate(texts):
                    row = {"id": None if inputs.ids[start + k] is None
                           else str(inputs.ids[start + k]),
                           "image": items[k], "caption": text}
                    if found is not None:
                        row.update(score_columns(found[k], by_caption))
                    rows.append(row)
                bar.update(len(items))
            write_part(out / part_name(i), rows, schema, {**provenance, "part": i})


def catalogue_cli(args: Any) -> dict:
    """Handler of ``galaxy-llava catalogue``."""
    s = build_catalogue(args.model, args.out, images=args.images, source=args.source,
                        rules=args.rules, batch_size=args.batch_size, num_beams=args.num_beams,
                        max_new_tokens=args.max_new_tokens, scores=not args.no_scores,
                        caption=getattr(args, "caption", None),
                        shard=args.shard, part_size=args.part_size, overwrite=args.overwrite,
                        allow_outside_paths=args.allow_outside_paths)
    print(f"catalogue {s['out']}: {s['items']} images in {s['parts']} part(s); this process "
          f"wrote {s['written']} and skipped {s['skipped']} already written; "
          f"{s['complete']}/{s['parts']} parts done")
    return s
