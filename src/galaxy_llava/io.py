"""Atomic file output: write to a temporary name beside the target, then rename.

A crash or Ctrl-C therefore never leaves a half-written dataset, checkpoint or report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    Works for files and folders (a folder target is replaced whole)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_item = tmp / target.name
    try:
        yield tmp_item
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp_item, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write pretty JSON atomically (NaN is not valid JSON: callers pass None instead)."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write one JSON object per line atomically, keys in insertion order (byte-stable)."""
    return write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
