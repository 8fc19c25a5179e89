"""A prepared dataset in the Hugging Face layout, beside galaxy-llava's own ``dataset.jsonl``:
``datasets.load_dataset(FOLDER)`` gives ``train`` / ``validation`` / ``test`` splits.

::

    README.md                                  dataset card; its ``configs:`` name the splits
    data/{split}-00000-of-00001.parquet        one or more shards per split

Parquet with the JPEG bytes embedded, not an ``imagefolder`` with metadata files: the ``image``
column then decodes wherever the folder goes (a copy, an upload to the Hub, another machine),
every ``datasets`` version reads it, and the Hub's viewer shows it. An ``imagefolder``
resolves a row's ``file_name`` only below its split's metadata file, so three splits sharing
one ``images/`` folder would need the images moved, which ``dataset.jsonl`` and the trainer
rely on. The price is disk: the parquet shards hold each JPEG twice (``image``, and ``images``
for TRL), so the dataset takes about three times the size of ``images/``.

Columns: ``image`` (an Image), ``id_str``, ``caption``, ``morphology`` (the caption's
attributes), ``fractions`` (the GZ2 vote fractions the rule set read and those the vote MSE
compares), ``votes`` (each question's total votes), and ``messages`` /
``images``, TRL's vision-language SFT format (a user turn holding the image and
:data:`galaxy_llava.config.DEFAULT_QUESTION`, an assistant turn holding the caption).
galaxy-llava's own loaders read ``dataset.jsonl`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

from galaxy_llava.config import DEFAULT_QUESTION, TAGS
from galaxy_llava.morphology import Morphology
from galaxy_llava.records import SPLITS

DATA_DIR = "data"
CARD = "README.md"
MAX_SHARD_BYTES = 256 * 2**20  # image bytes per parquet shard (the Hub suggests < 500 MB)


def messages(caption: str, question: str = DEFAULT_QUESTION) -> list[dict]:
    """One galaxy as TRL's vision-language conversation: the user turn holds the image and the
    question, the assistant turn the caption."""
    return [{"role": "user", "content": [{"type": "image", "text": None},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def features(fraction_columns: list[str], vote_columns: list[str] = ()):
    """The ``datasets.Features`` of every shard, declared so that shards and splits share one
    schema even where a column is empty in one of them (a shape no elliptical there has)."""
    from datasets import Features, Image, Value

    morphology = {f.name: Value("bool") if isinstance(f.default, bool) else Value("string")
                  for f in dataclasses.fields(Morphology) if f.name != "unparsed"}
    text = Value("string")
    return Features({
        "image": Image(), "id_str": text, "caption": text, "morphology": morphology,
        "fractions": {c: Value("float64") for c in fraction_columns},
        "votes": {c: Value("int64") for c in vote_columns},
        "messages": [{"role": text, "content": [{"type": text, "text": text}]}],
        "images": [Image()]})


def _shards(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive runs of rows whose image bytes (twice: two image columns) stay under
    ``limit``; one shard at least."""
    cuts, total = [0], 0
    for i, size in enumerate(sizes):
        if total and total + 2 * size > limit:
            cuts.append(i)
            total = 0
        total += 2 * size
    cuts.append(len(sizes))
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def write_hub_layout(folder: Path, records: list[dict], manifest: dict,
                     write: Callable[[Path, bytes], bool]) -> list[str]:
    """Write the parquet shards of every non-empty split and the dataset card into ``folder``
    (a prepared dataset whose images are in place) through ``write(path, bytes)``, and remove
    shards another run left; returns the shards' relative paths. Every byte is a function of
    the records and the manifest's settings (not of the folder's name or place)."""
    import datasets

    columns = list(records[0].get("fractions") or {}) if records else []
    totals = list(records[0].get("votes") or {}) if records else []
    feats = features(columns, totals)
    out = folder / DATA_DIR
    out.mkdir(exist_ok=True)
    written, counts = [], {}
    for split in SPLITS:
        rows = [r for r in records if r.get("split") == split]
        counts[split] = len(rows)
        if not rows:
            continue
        # Shards are planned from the files' sizes and each shard's images read only while it
        # is written: a full GZ2 split holds gigabytes of JPEGs, one shard at most 256 MB.
        parts = _shards([(folder / r["image"]).stat().st_size for r in rows], MAX_SHARD_BYTES)
        for k, part in enumerate(parts):
            rel = f"{DATA_DIR}/{split}-{k:05d}-of-{len(parts):05d}.parquet"
            write(folder / rel, _shard_bytes(folder, rows[part], feats, datasets))
            written.append(rel)
    for stale in out.glob("*.parquet"):
        if f"{DATA_DIR}/{stale.name}" not in written:
            stale.unlink()
    write(folder / CARD, dataset_card(counts, manifest).encode())
    return written


def _shard_bytes(folder: Path, rows: list[dict], feats, datasets) -> bytes:
    """One parquet shard of ``rows``, their JPEGs read from ``folder`` here (and dropped on
    return), so only one shard's images are in memory at a time."""
    table = []
    for r in rows:
        data = (folder / r["image"]).read_bytes()
        table.append({"image": {"bytes": data, "path": Path(r["image"]).name},
                      "id_str": r["id_str"], "caption": r["text"], "morphology": r["morphology"],
                      "fractions": r.get("fractions") or {}, "votes": r.get("votes") or {},
                      "messages": messages(r["text"]),
                      "images": [{"bytes": data, "path": Path(r["image"]).name}]})
    buf = io.BytesIO()
    with _quiet(datasets):  # a progress bar per shard of a few dozen rows is noise
        datasets.Dataset.from_list(table, features=feats).to_parquet(buf)
    return buf.getvalue()


@contextlib.contextmanager
def _quiet(datasets):
    """``datasets``' progress bars off for a while (they are a global switch)."""
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def dataset_card(counts: dict[str, int], manifest: dict) -> str:
    """The ``README.md`` of a prepared dataset: Hub metadata (``configs:`` naming each
    non-empty split's shards, so ``load_dataset`` finds them), what the columns hold, how the
    dataset was made, and how to load it."""
    from huggingface_hub import DatasetCard, DatasetCardData

    splits = [s for s in SPLITS if counts.get(s)]
    source = manifest.get("source") if manifest.get("source_kind") == "hub" else None
    data = DatasetCardData(
        pretty_name="Galaxy Zoo 2 captions", task_categories=["image-text-to-text"],
        tags=list(TAGS), size_categories=[_size_category(sum(counts.values()))],
        source_datasets=[source] if source else None,
        configs=[{"config_name": "default",
                  "data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in splits]}])
    rows = "\n".join(f"| {s} | {counts.get(s, 0)} |" for s in SPLITS)
    made = ", ".join(f"{k} {manifest[k]}" for k in ("rules", "min_votes", "n_per_class", "seed",
                                                     "image_size", "val_fraction",
                                                     "test_fraction")
                     if manifest.get(k) is not None)
    origin = (f"the Hub dataset [{source}](https://huggingface.co/datasets/{source})"
              + (f" (config `{manifest['hub_config']}`)" if manifest.get("hub_config") else "")
              if source else f"a {manifest.get('source_kind') or 'local'} catalogue")
    question = DEFAULT_QUESTION
    body = f"""# Galaxy Zoo 2 captions

Galaxy images with one-sentence captions of their Galaxy Zoo 2 morphology (type, shape, bar, arm
count, bulge, signs of a merger), written by `galaxy-llava prepare` from the volunteers' vote
fractions of {origin}: {made}.
Classes are balanced (elliptical: smooth fraction > 0.6; spiral: the rest) and stratified into
the splits.

| split | galaxies |
|---|---|
{rows}

## Columns

| column | what |
|---|---|
| `image` | the galaxy, a square RGB JPEG |
| `id_str` | the galaxy's catalogue id |
| `caption` | the caption, from the vote fractions under the rule set |
| `morphology` | the caption's attributes: type, shape, bar, arms, prominent/boxy bulge, disturbed |
| `fractions` | GZ2 vote fractions: those the rule set read and those the vote MSE compares (null: no volunteer reached the question) |
| `votes` | each question's total votes (how many volunteers were asked it) |
| `messages`, `images` | TRL's vision-language format: {question!r} and the image, then the caption |

## Use

```python
from datasets import load_dataset

ds = load_dataset("path/to/this/folder")  # or its Hub id once uploaded
ds["train"][0]["image"]  # a PIL image
```

`messages` and `images` are what TRL's `SFTTrainer` takes for vision-language fine-tuning; a
galaxy-llava model's chat template turns the user turn into its training prompt.
`dataset.jsonl` and `images/` are the same galaxies in galaxy-llava's own layout
(`galaxy-llava train --data FOLDER`); the parquet files embed the same JPEG bytes.
The Galaxy Zoo 2 catalogue (`mwalmsley/gz2`) is licensed cc-by-nc-sa-4.0.
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
