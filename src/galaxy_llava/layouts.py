"""Which parquet files of a local folder make one config and split of a dataset.

A local copy of a whole Hugging Face dataset repository (``hf download mwalmsley/gz2
--repo-type dataset``) holds one folder per config: ``data/`` for the default config, then
``tiny/``, and older ones such as ``all/`` or ``evo/`` with another schema. Its ``README.md``
may list them (``configs: - config_name: default, data_files: [{split, path}]``). Reading every
``*.parquet`` underneath would mix configs, so :func:`parquet_shards` reads exactly one: the
README's, else the folder convention (``default`` = ``data/``, any other name = its folder).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from galaxy_llava.errors import UserError

KNOWN_SPLITS = ("train", "test", "validation", "val")
DEFAULT_CONFIG = "default"
DEFAULT_FOLDER = "data"  # where the Hub puts the default config's files


def readme_configs(folder: Path) -> tuple[dict[str, dict[str | None, list[str]]], str | None]:
    """``({config: {split or None: [glob patterns]}}, the config marked default: true)`` from a
    dataset card's YAML header; ({}, None) when there is none."""
    card = folder / "README.md"
    if not card.is_file():
        return {}, None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}, None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return {}, None
    entries = meta.get("configs") if isinstance(meta, dict) else None
    configs: dict[str, dict[str | None, list[str]]] = {}
    default = None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        files = entry.get("data_files") or []
        by_split: dict[str | None, list[str]] = {}
        for item in files if isinstance(files, list) else [files]:
            if isinstance(item, str):
                by_split.setdefault(None, []).append(item)
            elif isinstance(item, dict) and "path" in item:
                paths = item["path"] if isinstance(item["path"], list) else [item["path"]]
                by_split.setdefault(item.get("split"), []).extend(map(str, paths))
        configs[str(entry["config_name"])] = by_split
        if entry.get("default"):
            default = str(entry["config_name"])
    return configs, default


def config_folders(folder: Path) -> dict[str, list[Path]]:
    """Top-level subfolders holding parquet files: ``{name: [files]}``."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*.parquet") if p.is_file())
        if files:
            found[sub.name] = files
    return found


def _pick(names: list[str], config: str | None, folder: Path, default: str | None) -> str:
    want = config or DEFAULT_CONFIG
    if want in names:
        return want
    if want == DEFAULT_CONFIG and default in names:
        return default
    raise UserError(f"folder {folder} holds the dataset configs {', '.join(names)}"
                    f"{f' ({default} is the default)' if default in names else ''}; "
                    f"--hub-config {want!r} is none of them")


def _marks(f: Path, base: Path, name: str) -> bool:
    rel = f.relative_to(base)
    return f.name.startswith((f"{name}-", f"{name}.", f"{name}_")) or name in rel.parts[:-1]


def _split_of(files: list[Path], base: Path, split: str, where: Path) -> list[Path]:
    ours = [f for f in files if _marks(f, base, split)]
    if ours:
        return ours
    others = sorted({s for s in KNOWN_SPLITS for f in files if _marks(f, base, s)})
    if others:  # split-named shards, but not of this split: never mix in another split
        raise UserError(f"folder {where} holds parquet shards of split(s) {', '.join(others)} "
                        f"but none of split {split!r}; pass --hub-split {others[0]}")
    return files


def parquet_shards(folder: Path, config: str | None, split: str) -> list[Path]:
    """The parquet files of one config and split under ``folder`` (a one-line UserError when the
    config or split is not there)."""
    cards, default = readme_configs(folder)
    if cards:
        name = _pick(sorted(cards), config, folder, default)
        patterns = cards[name]
        if split in patterns or None not in patterns:
            if split not in patterns:
                raise UserError(f"config {name!r} of {folder} has split(s) "
                                f"{', '.join(map(str, patterns))}, not {split!r}; pass --hub-split")
            return _existing(folder, patterns[split], name)
        return _split_of(_existing(folder, patterns[None], name), folder, split, folder)
    subfolders = config_folders(folder)
    loose = sorted(p for p in folder.glob("*.parquet") if p.is_file())
    if len(subfolders) > 1 or (subfolders and config and not loose):
        name = _pick(sorted(subfolders), config, folder, DEFAULT_FOLDER)
        return _split_of(subfolders[name], folder / name, split, folder / name)
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if not files:
        raise UserError(f"folder {folder} holds no parquet files and no save_to_disk dataset")
    if config and any(_marks(f, folder, config) for f in files):
        files = [f for f in files if _marks(f, folder, config)]
    return _split_of(files, folder, split, folder)


def _existing(folder: Path, patterns: list[str], name: str) -> list[Path]:
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.suffix == ".parquet"})
    if not files:
        raise UserError(f"config {name!r} of {folder}: no parquet file matches "
                        f"{', '.join(patterns)}")
    return files
