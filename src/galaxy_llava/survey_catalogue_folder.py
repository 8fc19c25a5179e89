"""A morphology catalogue's output folder: its manifest, the parts' stamps, who may write it
(:func:`claim_catalogue`), the leftovers a run removes, and the table of skipped inputs.

``OUT/_manifest.json`` records the inputs' identity, the settings and each part's stamp: a hash
of the settings and of that part's own inputs, stamped into the part's parquet metadata too. A
part whose file carries its stamp is done; a part of other inputs or settings is stale. The
leading underscore (also of ``_failures.csv``) makes pandas and pyarrow skip these files when
they read the folder as one table. Folders written before 2026-12 hold ``manifest.json``: still
recognised, and replaced on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Sequence

from galaxy_llava import outputs
from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, read_json_object, temp_pattern

# A leading underscore: pandas.read_parquet(CAT) and pyarrow.dataset skip these files.
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # before 2026-12: still read, replaced on the next run
FAILURES = "_failures.csv"
COMMAND = "catalogue"
META_KEY = b"galaxy_llava"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_STALE_TEMP_S = 60  # a manifest temporary older than this belongs to no live process


def part_name(i: int) -> str:
    """The file name of part ``i``."""
    return f"part-{i:05d}.parquet"


def read_manifest(out: Path) -> dict:
    """A catalogue folder's manifest (``_manifest.json``, or the ``manifest.json`` older
    versions wrote); {} when there is none."""
    found = read_json_object(out / MANIFEST)
    return found or read_json_object(out / LEGACY_MANIFEST)


def fingerprint(identity: dict) -> str:
    """A short hash of a catalogue's identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def part_stamps(inputs, settings: dict, part_size: int) -> list[str]:
    """Each part's stamp: a hash of the settings and of that part's own items (``inputs``: a
    :class:`galaxy_llava.survey_catalogue.Inputs`; its keys hold paths, sizes and ids; its
    columns the user's own). A part stays valid while its own inputs do, so a retry with
    other inputs keeps the parts they do not change."""
    base = json.dumps({**settings, "source": inputs.identity.get("source")}, sort_keys=True)
    stamps = []
    for lo in range(0, len(inputs.ids), part_size):
        hi = lo + part_size
        extra = (inputs.columns.iloc[lo:hi].to_json(orient="values")
                 if inputs.columns is not None and len(inputs.columns.columns) else "")
        h = hashlib.sha256(base.encode())
        h.update(json.dumps(inputs.keys[lo:hi]).encode() + extra.encode())
        stamps.append(h.hexdigest()[:16])
    return stamps


def _old_stamps(manifest: dict) -> list:
    """The part stamps a manifest records (older ones: one fingerprint for every part)."""
    return manifest.get("stamps") or [manifest.get("fingerprint")] * int(manifest.get("parts")
                                                                         or 0)


def is_finished(out: Path, manifest: dict) -> bool:
    """Whether every part the manifest names is there with its stamp."""
    stamps = _old_stamps(manifest)
    return bool(stamps) and all(part_fingerprint(out / part_name(i)) == st
                                for i, st in enumerate(stamps))


def claim_catalogue(out: Path, identity: dict, overwrite: bool) -> str:
    """The outputs contract for OUT: ``"new"``, ``"same"`` (a re-run or another shard),
    ``"continue"`` (an unfinished catalogue of other inputs or settings: a retry after a
    failure; its parts that are still valid are kept) or ``"replace"`` (a finished one, with
    ``overwrite``). Refuses, in one line, anything else: another kind of output, a prepared
    dataset, a finished catalogue of other inputs without ``--overwrite``. Changes nothing."""
    found = outputs.check_kind(out, "morphology")  # refuses datasets and everything else
    if found in (None, "empty"):
        return "new"
    old = read_manifest(out)
    diffs = outputs.differences(old.get("identity") or {}, identity)
    if not diffs:
        return "same"
    if not is_finished(out, old):
        return "continue"
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


def remove_stale(out: Path, stamps: list[str], parts: Sequence[int]) -> None:
    """Remove the leftovers of interrupted writes of ``parts`` (this process's), manifest and
    failure-table temporaries older than a minute, an older version's manifest, and parts that
    belong to other inputs or settings."""
    mine = [temp_pattern(part_name(i)) for i in parts]
    shared = [temp_pattern(MANIFEST), temp_pattern(FAILURES)]
    now = time.time()
    for e in os.scandir(out):
        path = Path(e.path)
        if any(p.match(e.name) for p in mine):
            outputs.remove(path)
        elif any(p.match(e.name) for p in shared) and now - e.stat().st_mtime > _STALE_TEMP_S:
            outputs.remove(path)
        elif e.name == LEGACY_MANIFEST:
            outputs.remove(path)
        elif (m := _PART.match(e.name)) and (int(m.group(1)) >= len(stamps) or part_fingerprint(
                path) != stamps[int(m.group(1))]):
            outputs.remove(path)


def part_failures(path: Path) -> list[list[str]]:
    """The inputs a part skipped, ``[image, id, reason]`` each (from its parquet metadata)."""
    import pyarrow.parquet as pq

    try:
        return json.loads(pq.read_schema(path).metadata[META_KEY]).get("failures") or []
    except Exception:
        return []


def write_failures(out: Path, stamps: list[str]) -> int:
    """``OUT/_failures.csv`` (image, id, reason) from every finished part's record of what it
    skipped, rewritten atomically (removed when nothing was skipped); returns the count."""
    import csv

    rows = [r for i, st in enumerate(stamps) if part_fingerprint(out / part_name(i)) == st
            for r in part_failures(out / part_name(i))]
    if not rows:
        outputs.remove(out / FAILURES)
        return 0
    with atomic_path(out / FAILURES) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "id", "reason"])
        writer.writerows(rows)
    return len(rows)
