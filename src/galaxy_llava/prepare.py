"""Build the caption dataset: a balanced, seeded selection of GZ2 galaxies, resized JPEGs,
captions under a rule set, stratified train/validation/test splits, statistics and a preview.

Output folder::

    manifest.json   arguments and a fingerprint of the catalogue (guards against mixing datasets)
    dataset.jsonl   {"image", "text", "id_str", "split", "morphology", "fractions", "votes"}
                    per galaxy: the caption's attributes, the vote fractions the rule set
                    reads and those every rule set's vote MSE needs, each question's total votes
    images/<md5(id_str)>.jpg
    stats.json      counts, caption lengths, skipped images
    preview.png     a grid of sample galaxies with their captions
    README.md, data/{train,validation,test}-*.parquet
                    the Hugging Face layout: ``datasets.load_dataset(out)`` gives the splits,
                    images embedded, TRL's ``messages``/``images`` (:mod:`galaxy_llava.hub_dataset`)

Every file is a pure function of the arguments and the catalogue, so a re-run writes nothing
new: images already present are kept and the other files are only replaced when their bytes
would change. The folder is built in a temporary sibling and swapped in at the end
(:func:`galaxy_llava.outputs.staged_folder`): a run that fails or is killed leaves ``out`` as it
was, and a folder holding something else is refused (:func:`galaxy_llava.outputs.claim`).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from galaxy_llava import __version__, io as gio, outputs
from galaxy_llava.calibration import vote_record_columns
from galaxy_llava.gz2_catalog import ID_COLUMN, Catalog, ImageError, decode_image, load_catalog
from galaxy_llava.errors import UserError
from galaxy_llava.gz2 import col
from galaxy_llava.hub_dataset import write_hub_layout
from galaxy_llava.morphology import ATTRIBUTES, TYPES
from galaxy_llava.records import SPLITS
from galaxy_llava.rules import is_elliptical, rule_set

CLASSES = ("elliptical", "spiral")
MANIFEST_FORMAT = "galaxy-llava-prepared/1"
# Manifest fields that decide the dataset's content; the rest (source path, versions) are
# informational, so the same catalogue copied elsewhere still matches.
IDENTITY_KEYS = ("rules", "min_votes", "n_per_class", "seed", "image_size", "val_fraction",
                 "test_fraction", "catalog_rows", "catalog_sha256")
JPEG_QUALITY = 85
_MAX_WARNINGS = 10


def prepare(source: str | os.PathLike, out: str | os.PathLike, *, n_per_class: int = 1000,
            seed: int = 42, image_size: int = 336, rules: str = "reference", min_votes: int = 5,
            val_fraction: float = 0.1, test_fraction: float = 0.1, hub_config: str | None = None,
            hub_split: str = "train", workers: int | None = None, overwrite: bool = False,
            allow_outside_paths: bool = False, images_root: str | os.PathLike | None = None
            ) -> dict:
    """Select ``n_per_class`` elliptical and spiral galaxies, write images, captions, splits,
    stats and a preview under ``out``; return the stats.

    ``out`` may be new, empty, or a dataset prepared with the same settings from the same
    catalogue (its images are reused); another dataset needs ``overwrite``. Catalogue image
    paths outside the catalogue's folder need ``allow_outside_paths``; ``images_root`` is the
    folder a catalogue's relative image paths (``file_loc``, galaxy-datasets' ``subfolder`` +
    ``filename``) are read from.

    An unreadable, truncated or oversized image is skipped with a warning naming the galaxy and
    listed in the stats, not replaced by another galaxy: the selection and the splits stay a pure
    function of the votes and the seed, so classes may then differ by the skipped count.
    """
    _check_args(n_per_class, seed, image_size, rules, min_votes, val_fraction, test_fraction,
                workers)
    out = Path(out)
    workers = workers or min(4, os.cpu_count() or 1)
    # min_votes is part of the dataset's identity only for rule sets that read it.
    args = {"rules": rules, "min_votes": min_votes if rule_set(rules).uses_min_votes else None,
            "n_per_class": n_per_class, "seed": seed, "image_size": image_size,
            "val_fraction": val_fraction, "test_fraction": test_fraction}
    # cheap: before a possibly large catalogue is opened
    outputs.claim(out, "dataset", overwrite=overwrite, identity=lambda o: _differences(o, args))
    catalog = load_catalog(source, rules=rules, hub_config=hub_config, hub_split=hub_split,
                           allow_outside=allow_outside_paths, images_root=images_root,
                           extra=vote_record_columns())
    manifest = {"format": MANIFEST_FORMAT, "source": _source_name(source),
                "source_kind": catalog.kind, "hub_config": hub_config, "hub_split": hub_split,
                **args, "catalog_rows": len(catalog),
                "catalog_sha256": _fingerprint(catalog, rule_set(rules).columns)}
    status = outputs.claim(out, "dataset", overwrite=overwrite,
                           identity=lambda o: _differences(o, manifest))

    usable, excluded = _usable_rows(catalog.votes)
    sel = select(catalog.votes.loc[usable], n_per_class, seed, val_fraction, test_fraction)
    with outputs.staged_folder(out, keep=status == "same") as stage:
        if not (stage / "manifest.json").exists():  # a re-run keeps the first run's
            gio.write_json(stage / "manifest.json", {**manifest, "version": __version__})
        # The stats and the card describe the manifest on disk: the same dataset reached
        # another way (a copy of the catalogue elsewhere, another format) is the same bytes.
        recorded = json.loads((stage / "manifest.json").read_text())
        records = _records(catalog.votes, sel, rules, min_votes)
        failed, written, reused = _write_images(catalog, sel["row"].tolist(), records,
                                                stage / "images", image_size, workers)
        kept = [r for row, r in zip(sel["row"], records) if row not in failed]
        if not kept:
            first = next(iter(failed.values()))
            raise UserError(f"none of the {len(records)} selected images could be read "
                            f"(first: {first})")
        changed = _write_if_changed(
            stage / "dataset.jsonl",
            "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode())
        stats = _stats(records, sel, failed, excluded, n_per_class, recorded)
        _write_if_changed(stage / "stats.json", (json.dumps(stats, indent=2) + "\n").encode())
        write_hub_layout(stage, kept, recorded, _write_if_changed)
        if changed or not (stage / "preview.png").exists():  # same records: save ~2 s
            gio.write_bytes(stage / "preview.png", render_preview(stage, kept))
    _print_summary(stats, out, written, reused)
    return {**stats, "images_written": written, "images_reused": reused}


def select(votes: pd.DataFrame, n_per_class: int, seed: int, val_fraction: float = 0.1,
           test_fraction: float = 0.1) -> pd.DataFrame:
    """Balanced seeded selection, vectorised over the smooth-fraction column.

    Returns one row per selected galaxy in record order with columns ``row`` (catalogue
    position), ``class`` and ``split``; ``.attrs`` holds ``available`` and ``n_per_class``.
    Like the notebook, both classes get ``min(N, #elliptical, #spiral)`` galaxies.
    """
    smooth = votes[col("smooth-or-featured", "smooth")].to_numpy(np.float64)
    is_ell = is_elliptical(smooth)  # NaN > 0.6 is False: spiral, as in the notebook
    rows = votes.index.to_numpy()
    pools = {"elliptical": rows[is_ell], "spiral": rows[~is_ell]}
    available = {c: int(len(p)) for c, p in pools.items()}
    n = min(n_per_class, *available.values())
    if n == 0:
        raise UserError("empty selection: the catalogue has " + " and ".join(
            f"{available[c]} {c} galaxies" for c in CLASSES) + " (elliptical: smooth fraction "
            "> 0.6); both classes are needed")
    rng = np.random.default_rng(seed)
    parts = []
    for c in CLASSES:
        chosen = rng.permutation(pools[c])[:n]  # a random prefix: larger N extends the set
        n_test = _round(n * test_fraction)
        n_val = _round(n * val_fraction)
        split = np.array(["test"] * n_test + ["validation"] * n_val
                         + ["train"] * (n - n_test - n_val))
        parts.append(pd.DataFrame({"row": chosen, "class": c, "split": split}))
    sel = pd.concat(parts, ignore_index=True)
    sel = sel.iloc[rng.permutation(len(sel))].reset_index(drop=True)  # interleave the classes
    sel.attrs.update(available=available, n_per_class=n)
    return sel


def image_name(id_str: str) -> str:
    """File name of a galaxy's image: the md5 of its id, as in the notebook."""
    return hashlib.md5(str(id_str).encode()).hexdigest() + ".jpg"


def to_jpeg(data: bytes, size: int) -> bytes:
    """Decode untrusted image bytes and return a ``size``-square RGB JPEG (quality 85).

    A non-square image is padded with black to a square first, so that resizing never
    stretches a galaxy (elongation is one of the caption's attributes)."""
    img = decode_image(data)
    try:
        img = img.convert("RGB")
        if img.width != img.height:
            side = max(img.size)
            canvas = Image.new("RGB", (side, side))
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = canvas
        img = img.resize((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    except (OSError, ValueError) as e:  # an odd mode PIL cannot convert
        raise ImageError(f"cannot convert image ({type(e).__name__}: {e})") from None
    return buf.getvalue()


def render_preview(out: Path, records: list[dict], n: int = 16) -> bytes:
    """PNG bytes of a grid of up to ``n`` galaxies (both classes) with wrapped captions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    by_class = [[r for r in records if r["morphology"]["type"] == c] for c in CLASSES]
    picks = [r for pair in zip(*by_class) for r in pair][:n]  # alternate the classes
    for r in records:  # top up (a class ran short, or tree-rule types) in record order
        if len(picks) >= n:
            break
        if all(r is not p for p in picks):
            picks.append(r)
    cols, cell_w, cell_h, text_h = 4, 3.0, 3.9, 0.8  # inches
    rows = max(1, math.ceil(len(picks) / cols))
    fig = Figure(figsize=(cols * cell_w, rows * cell_h))
    FigureCanvasAgg(fig)
    fw, fh = fig.get_figwidth(), fig.get_figheight()
    for k, rec in enumerate(picks):
        # Explicit axes and plain text: subplot titles and layout engines cost seconds.
        x0, y0 = (k % cols) * cell_w, fh - (k // cols + 1) * cell_h
        ax = fig.add_axes(((x0 + 0.05) / fw, (y0 + 0.05) / fh, (cell_w - 0.1) / fw,
                           (cell_h - text_h - 0.1) / fh))
        with Image.open(out / rec["image"]) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        ax.set_axis_off()
        fig.text((x0 + 0.08) / fw, (y0 + cell_h - 0.05) / fh, f"{rec['id_str']} ({rec['split']})\n"
                 + textwrap.fill(rec["text"], 44), fontsize=7, va="top", ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---------------------------------------------------------------- helpers

def _check_args(n_per_class, seed, image_size, rules, min_votes, val_fraction, test_fraction,
                workers) -> None:
    rule_set(rules)  # an unknown name is a UserError listing the known ones
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise UserError(f"--n-per-class must be at least 1 (got {n_per_class})")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer (got {seed})")
    if not 8 <= image_size <= 4096:
        raise UserError(f"--image-size must be between 8 and 4096 pixels (got {image_size})")
    if min_votes < 0:
        raise UserError(f"--min-votes must be non-negative (got {min_votes})")
    for flag, f in (("--validation-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= f < 1:
            raise UserError(f"{flag} must be in [0, 1) (got {f})")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--validation-fraction + --test-fraction must be below 1 "
                        f"(got {val_fraction} + {test_fraction}): no galaxies left to train on")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up: Python's round() is half-to-even


def _source_name(source: Any) -> str:
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _fingerprint(catalog: Catalog, columns: tuple[str, ...]) -> str:
    """sha256 of the ids and the rule set's vote values: the same catalogue gives the same hash
    anywhere (the columns records keep beyond those never decide a caption)."""
    v = catalog.votes
    cols = list(columns)
    values = v[cols].to_numpy(np.float64)
    values = np.where(np.isnan(values), np.nan, values)  # one NaN bit pattern
    h = hashlib.sha256("\n".join(cols).encode())
    h.update("\0".join("" if i is None else str(i) for i in v[ID_COLUMN]).encode())
    h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def _differences(out: Path, fields: dict) -> list[str]:
    """How the dataset in ``out`` differs from one made with ``fields`` (never mix two
    datasets' images); [] when it is the same dataset."""
    path = out / "manifest.json"
    if not path.exists():
        return ["it has no manifest.json (an unfinished or foreign folder)"]
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"its manifest.json is unreadable ({e})"]
    diffs = [f"{k} {old.get(k)!r} -> {fields[k]!r}" for k in IDENTITY_KEYS
             if k in fields and old.get(k) != fields[k]]
    if "catalog_sha256" in fields and old.get("catalog_sha256") != fields["catalog_sha256"]:
        diffs = [d for d in diffs if not d.startswith(("catalog_sha256", "catalog_rows"))]
        diffs.append(f"catalogue content differs (was prepared from {old.get('source')}, "
                     f"now {fields['source']})")
    return diffs


def _usable_rows(votes: pd.DataFrame) -> tuple[pd.Index, dict]:
    """Rows with an id; a repeated id keeps its first row (one image file per id)."""
    ids = votes[ID_COLUMN]
    missing = ids.isna() | (ids.astype(str).str.strip() == "")
    dup = ids.duplicated(keep="first") & ~missing
    for what, mask in (("no id_str", missing), ("a repeated id_str", dup)):
        if mask.any():
            print(f"warning: {int(mask.sum())} catalogue row(s) with {what} left out",
                  file=sys.stderr)
    return votes.index[~(missing | dup)], {"missing_id": int(missing.sum()),
                                           "duplicate_id": int(dup.sum())}


def record_columns(rules: str) -> tuple[list[str], list[str]]:
    """The vote fractions and the total-vote columns a record of this rule set keeps: what the
    rules read, then what every rule set's vote MSE needs (the same list for every rule set
    past the rules' own, so datasets of both rule sets can be compared on the same votes)."""
    names = list(dict.fromkeys((*rule_set(rules).columns, *vote_record_columns())))
    return ([c for c in names if c.endswith("_fraction")],
            [c for c in names if c.endswith("_total-votes")])


def _records(votes: pd.DataFrame, sel: pd.DataFrame, rules: str, min_votes: int) -> list[dict]:
    ruleset = rule_set(rules)
    fraction_cols, total_cols = record_columns(rules)

    def value(row: dict, c: str, kind=float):
        v = row.get(c)
        return None if v is None or math.isnan(v) else kind(v)

    rows = votes.iloc[sel["row"].to_numpy()].to_dict("records")
    records = []
    for row, split in zip(rows, sel["split"]):
        m = ruleset.morphology(row, min_votes)
        records.append({
            "image": f"images/{image_name(row[ID_COLUMN])}",
            "text": m.caption(),  # == caption_from_fractions(row, rules, min_votes)
            "id_str": str(row[ID_COLUMN]),
            "split": split,
            "morphology": m.to_dict(),  # every key always present: one Arrow schema
            "fractions": {c: value(row, c) for c in fraction_cols},
            "votes": {c: value(row, c, int) for c in total_cols},
        })
    return records


def _convert_and_write(data: bytes, dest: Path, size: int) -> str | None:
    """Worker: the reason an image was refused, or None once its JPEG is written."""
    try:
        jpeg = to_jpeg(data, size)
    except ImageError as e:
        return str(e)
    gio.write_bytes(dest, jpeg)  # disk errors are not the image's fault: they propagate
    return None


def _write_images(catalog: Catalog, rows: list[int], records: list[dict], folder: Path,
                  size: int, workers: int) -> tuple[dict[int, str], int, int]:
    """Write the missing JPEGs (decode/resize/encode in threads: PIL releases the GIL there).

    Returns ({row: reason} for refused images, #written, #already present)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = {row: folder / Path(r["image"]).name for row, r in zip(rows, records)}
    ids = {row: r["id_str"] for row, r in zip(rows, records)}
    todo = [row for row in rows if not dest[row].exists()]
    failed: dict[int, str] = {}

    def done(row: int, reason: str | None) -> None:
        if reason is not None:
            failed[row] = reason
            if len(failed) <= _MAX_WARNINGS:
                tqdm.write(f"warning: galaxy {ids[row]}: {reason}; skipped", file=sys.stderr)

    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not todo)
    pool = cf.ThreadPoolExecutor(workers) if workers > 1 else None
    pending: dict[cf.Future, int] = {}
    try:
        for row, data, err in catalog.image_bytes(todo):
            if err is not None:
                done(row, err)
                bar.update()
            elif pool is None:
                done(row, _convert_and_write(data, dest[row], size))
                bar.update()
            else:
                pending[pool.submit(_convert_and_write, data, dest[row], size)] = row
                if len(pending) >= 4 * workers:  # bound the encoded images held in memory
                    finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        done(pending.pop(fut), fut.result())
                        bar.update()
        for fut in cf.as_completed(list(pending)):
            done(pending.pop(fut), fut.result())
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if len(failed) > _MAX_WARNINGS:
        print(f"warning: {len(failed)} images skipped in all (listed in stats.json)",
              file=sys.stderr)
    return failed, len(todo) - len(failed), len(rows) - len(todo)


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write, skipped when the bytes are already there (a re-run leaves mtimes alone).

    Returns whether the file was written."""
    if path.exists() and path.read_bytes() == data:
        return False
    gio.write_bytes(path, data)
    return True


def _types(rules: str, records: list[dict]) -> list[str]:
    """The galaxy types a dataset's counts list, in caption-grammar order: every type the rule
    set can produce (0 when none was drawn, so the counts keep one layout per rule set), then
    any other type a record has."""
    known = {m.type for m in rule_set(rules).reachable()}
    seen = {r["morphology"]["type"] for r in records}
    return [t for t in TYPES if t in known | seen] + sorted(seen - set(TYPES))


def _stats(records: list[dict], sel: pd.DataFrame, failed: dict[int, str], excluded: dict,
           n_requested: int, manifest: dict) -> dict:
    """Counts, caption lengths, skipped images; ``records``: all selected, in ``sel`` order.

    ``classes`` and ``splits`` count the galaxies by type as their captions say it (under the
    tree rules edge-on disks and artifacts too); ``selection`` counts them by the balanced
    selection class (smooth fraction > 0.6 or not), which ``available``, ``n_per_class`` and
    the capped note are about."""
    n = sel.attrs["n_per_class"]
    available = sel.attrs["available"]
    note = None
    if n < n_requested:
        short = min(CLASSES, key=lambda c: available[c])
        note = (f"asked for {n_requested} per class but the catalogue has only "
                f"{available[short]} {short} galaxies: took {n} of each")
    types = _types(manifest["rules"], records)
    split_counts = {s: {t: 0 for t in types} for s in SPLITS}
    selection = {c: 0 for c in CLASSES}
    kept, skipped = [], []
    for row, c, r in zip(sel["row"], sel["class"], records):
        if row in failed:
            skipped.append({"id_str": r["id_str"], "reason": failed[row]})
        else:
            kept.append(r)
            split_counts[r["split"]][r["morphology"]["type"]] += 1
            selection[c] += 1
    by_type: dict[str, list[dict]] = {}
    for r in kept:
        by_type.setdefault(r["morphology"]["type"], []).append(r["morphology"])
    attrs = [a for a in ATTRIBUTES if a != "type"]

    def n_attrs(m: dict) -> int:
        return sum(bool(m[a]) for a in attrs)

    ordered = sorted(kept, key=lambda r: len(r["text"]))  # stable: ties keep record order
    return {
        "n_records": len(kept),
        "classes": {t: sum(v[t] for v in split_counts.values()) for t in types},
        "splits": {s: {**v, "total": sum(v.values())} for s, v in split_counts.items()},
        "selection": selection,
        "available": available,
        "n_per_class_requested": n_requested,
        "n_per_class": n,
        "capped_note": note,
        "morphology_types": {t: len(v) for t, v in sorted(by_type.items())},
        # attributes stated beyond the type clause (the notebook's count included the type)
        "mean_attributes": {t: round(float(np.mean([n_attrs(m) for m in v])), 3)
                            for t, v in sorted(by_type.items())},
        "attribute_rates": {t: {a: round(sum(bool(m[a]) for m in v) / len(v), 3) for a in attrs}
                            for t, v in sorted(by_type.items())},
        "captions": {"shortest": ordered[0]["text"], "median": ordered[len(ordered) // 2]["text"],
                     "longest": ordered[-1]["text"], "distinct": len({r["text"] for r in kept})},
        "skipped_images": skipped,
        "excluded_rows": excluded,
        "manifest": {k: v for k, v in manifest.items() if k not in ("format", "version")},
    }


def _print_summary(stats: dict, out: Path, written: int, reused: int) -> None:
    print(f"\n=== {out} ===")
    print(f"records: {stats['n_records']}  " + "  ".join(
        f"{t}: {n}" for t, n in stats["classes"].items()))
    chosen = stats["selection"]
    if chosen != stats["classes"]:  # the types are not the selection classes (tree rules)
        print(f"  balanced selection: {chosen['elliptical']} with smooth fraction > 0.6, "
              f"{chosen['spiral']} without")
    for s, v in stats["splits"].items():
        print(f"  {s:5s}: " + "  ".join(f"{k}={n}" for k, n in v.items()))
    if stats["capped_note"]:
        print(f"note: {stats['capped_note']}")
    print("mean attributes per caption (beyond the type): " + ", ".join(
        f"{t} {m}" for t, m in stats["mean_attributes"].items()))
    for k in ("shortest", "median", "longest"):
        print(f"{k:8s}: {stats['captions'][k]}")
    print(f"images: {written} written, {reused} already present, "
          f"{len(stats['skipped_images'])} skipped")
