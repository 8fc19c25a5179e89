"""Validation before work: numbers in range, paths inside their folder, weights and checkpoints
intact, all without importing torch (a model folder's health is checked in
:mod:`galaxy_llava.models.preflight`).

Everything here runs before a model is loaded, so a typo costs a second, not a model load, and
every problem is a one-line :class:`~galaxy_llava.errors.UserError` naming the setting or file.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

from galaxy_llava.errors import UserError

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (optimizer.pt, scheduler.pt, rng_state.pth)
_TESTZIP_BYTES = 512 * 2**20  # CRC-check members of files up to this size (reads them whole)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def number(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, integer: bool = False,
           optional: bool = False) -> None:
    """Refuse a value that is not a finite number in [low, high] (open ends as asked)."""
    if value is None and optional:
        return
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise UserError(f"{flag} must be {kind} (got {value!r})")
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number (got {value})")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if low is not None and high is not None:
            want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            want = f"{'>' if low_open else '>='} {low}"
        else:
            want = f"{'<' if high_open else '<='} {high}"
        raise UserError(f"{flag} must be {want} (got {value})")


def seed(flag: str, value: Any) -> None:
    """A random seed numpy and torch accept: an integer in [0, 2**32)."""
    number(flag, value, 0, 2**32, high_open=True, integer=True)


# ----------------------------------------------------------------- containment

def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies under ``root`` once links are followed: a link inside ``root`` to a
    file elsewhere is outside (``root`` may itself be reached through a link)."""
    rp, rr = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([rp, rr]) == rr


def contained(path: str | os.PathLike, root: Path, allow_outside: bool, where: str) -> Path:
    """``path`` resolved against ``root`` (absolute, ``..`` collapsed); a path that leaves
    ``root``, as written or through a link, is a UserError unless ``allow_outside``."""
    p = Path(os.path.expanduser(path))
    p = Path(os.path.normpath(p if p.is_absolute() else root / p))
    if not allow_outside and not inside(p, root):
        as_written = os.path.commonpath([p, os.path.abspath(root)]) == os.path.abspath(root)
        leaves = (f"leads through a link to {os.path.realpath(p)}," if as_written else "is")
        raise UserError(f"{where}: image {path} {leaves} outside the folder {root}; images are "
                        "read only from inside it unless you pass --allow-outside-paths")
    return p


# ----------------------------------------------------------------- weights and checkpoints

def check_safetensors(path: Path) -> None:
    """Header and size of a .safetensors file agree (a truncated download or copy does not)."""
    damaged = f"{path} is truncated or corrupt"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{damaged} ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise UserError(f"{damaged} (its header runs past the end of the file)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{damaged} (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{damaged} (unreadable header)")
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                  or [0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{damaged} (malformed tensor table)") from None
    if 8 + n + end != size:
        raise UserError(f"{damaged} ({size} bytes where its header needs {8 + n + end})")


def check_torch_file(path: Path) -> None:
    """A torch.save zip (optimizer, scheduler, RNG state) is whole: central directory present
    and, for files up to 512 MB, every member's CRC right."""
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return  # a legacy pickle: nothing cheap to check
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if path.stat().st_size <= _TESTZIP_BYTES else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is truncated or corrupt ({e})") from None
    if bad is not None:
        raise UserError(f"{path} is corrupt (member {bad} fails its checksum)")


def check_weights(folder: Path) -> None:
    """Every weights file directly in ``folder`` is whole, and a sharded index names only
    shards that are there."""
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors" and f.is_file():
            check_safetensors(f)
        elif f.suffix in _TORCH_SUFFIXES and f.is_file():
            check_torch_file(f)
        elif f.name.endswith(".safetensors.index.json"):
            try:
                shards = set(json.loads(f.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{f} is not a valid weights index") from None
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                raise UserError(f"{f} names missing shard(s): {', '.join(missing[:3])}")


def check_checkpoint(checkpoint: Path) -> None:
    """A Trainer checkpoint to resume from: its state readable and every file whole."""
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        raise UserError(f"{state} is missing or not valid JSON: the checkpoint is incomplete; "
                        "resume from an earlier checkpoint folder") from None
    try:
        check_weights(checkpoint)
    except UserError as e:
        raise UserError(f"checkpoint {checkpoint} is damaged: {e}; resume from an earlier "
                        "checkpoint folder, or train again with --overwrite_output_dir") from None

