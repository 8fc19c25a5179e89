"""Atomic file output: write to a temporary name beside the target, then rename.

A crash or Ctrl-C therefore never leaves a half-written dataset, checkpoint or report. The
temporary names follow two patterns that :func:`recover` and
:func:`galaxy_llava.outputs.clean_leftovers` recognise after a crash: ``.<name>.<8 chars>.tmp``
(a write in progress) and ``.<name>.old`` (the previous folder while a new one is swapped in).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

# tempfile.mkdtemp's random part: 8 characters of [a-z0-9_].
_TMP_PART = r"[a-z0-9_]{8}"


def temp_pattern(name: str) -> re.Pattern:
    """The names :func:`atomic_path` gives its temporary folders for a target called ``name``."""
    return re.compile(rf"^\.{re.escape(name)}\.{_TMP_PART}\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is an :func:`atomic_path` temporary or swap leftover of any target."""
    return bool(re.match(rf"^\..+\.{_TMP_PART}\.tmp$", name)) or (
        name.startswith(".") and name.endswith(".old"))


def recover(target: str | os.PathLike) -> None:
    """Undo what a crash in the middle of a folder swap left: the previous folder
    ``.<name>.old`` goes back to ``target`` when ``target`` is missing, else it is removed."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not old.exists():
        return
    if target.exists() or target.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, target)


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; a folder target is first renamed aside (``.name.old``)
    so that a crash in between leaves something :func:`recover` can put back."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    Works for files and folders (a folder target is replaced whole). On failure nothing changes:
    the temporary is removed, and so are the parent folders this call had to create."""
    target = Path(target)
    recover(target)
    created = _missing_parents(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    done = False
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp_item = tmp / target.name
        yield tmp_item
        _swap_in(tmp_item, target)
        done = True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file's top-level object, or {} when the file is absent, unreadable, not JSON or
    not an object: for markers and manifests read to recognise a folder, best effort."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write pretty JSON atomically (NaN is not valid JSON: callers pass None instead)."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write one JSON object per line atomically, keys in insertion order (byte-stable)."""
    return write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
