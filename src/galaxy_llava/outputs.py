"""The output contract every command follows, in one place.

1. An output that exists and was not made by the same command for the same inputs is refused in
   one line; ``--overwrite`` replaces it, but only by the same kind of thing: a folder is never
   replaced by a file, nor a dataset by a model, nor a folder of someone's files by anything.
2. A command that fails leaves its output as it was: outputs are built in a temporary sibling
   (:func:`staged_folder`, :func:`galaxy_llava.io.atomic_path`) and swapped in at the end.
3. A run that succeeds removes the temporary leftovers of earlier interrupted runs in its output
   (:func:`clean_leftovers`); a swap cut in half is undone before anything else
   (:func:`galaxy_llava.io.recover`).

Each kind of output is recognised by the files it holds (:func:`kind_of`) and remembers what it
was made from (:func:`identity_of`): the prepared dataset's ``manifest.json``, a model's
``galaxy_llava.json``, an EVAL folder's ``metrics.json`` (``inputs``), a report's
``<meta name="galaxy-llava-inputs">``, a synthetic catalogue's ``synth.json``.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from galaxy_llava.errors import UserError
from galaxy_llava.io import atomic_path, is_temporary, read_json_object, recover, temp_pattern
from galaxy_llava.run_layout import looks_like_a_run

SYNTH_MARKER = "synth.json"
REPORT_TITLE = "<title>galaxy-llava report</title>"
REPORT_META = "galaxy-llava-inputs"
# kind: (what it is called, its short name, the file that marks it, the command that makes it)
KINDS: dict[str, tuple[str, str, str, str]] = {
    "catalogue": ("a synthetic catalogue", "catalogue", SYNTH_MARKER, "synth"),
    "dataset": ("a prepared dataset", "dataset", "manifest.json", "prepare"),
    "morphology": ("a morphology catalogue", "morphology catalogue",
                   "_manifest.json (command: catalogue)", "catalogue"),
    "model": ("a model folder", "model", "config.json", "tiny-model or export"),
    "run": ("a training run", "training run", "config.yaml or checkpoint-N/", "train"),
    "eval": ("an EVAL folder", "evaluation", "metrics.json", "evaluate or probe"),
    "report": ("an HTML report", "report", "", "report"),
    "file": ("a file", "file", "", ""),
    "folder": ("a folder of other files", "folder", "", ""),
}


def _entries(folder: Path) -> set[str]:
    return {e.name for e in os.scandir(folder) if not is_temporary(e.name)}


def is_report(path: Path) -> bool:
    """Whether a file is an HTML report written by ``galaxy-llava report``."""
    try:
        with open(path, "rb") as f:
            return REPORT_TITLE.encode() in f.read(8192)
    except OSError:
        return False


def kind_of(path: str | os.PathLike) -> str | None:
    """What ``path`` holds: None (nothing), ``"empty"`` (an empty folder), one of :data:`KINDS`.

    Told apart by marker files, most specific first: a run also holds ``galaxy_llava.json``,
    a model folder ``config.json``."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return None
    if not p.is_dir():
        return "report" if is_report(p) else "file"
    names = _entries(p)
    if not names:
        return "empty"
    if names & {"manifest.json", "dataset.jsonl", "_manifest.json"}:
        # a catalogue's manifest: _manifest.json (manifest.json before 2026-12)
        manifest = read_json_object(p / "_manifest.json") or (
            read_json_object(p / "manifest.json") if "manifest.json" in names else {})
        return "morphology" if manifest.get("command") == "catalogue" else "dataset"
    if SYNTH_MARKER in names:
        return "catalogue"
    if "config.json" in names:
        return "model"
    if names & {"metrics.json", "predictions.jsonl"}:
        return "eval"
    if looks_like_a_run(names, p):
        return "run"
    return "folder"


def identity_of(path: str | os.PathLike, kind: str) -> dict:
    """What an existing output of ``kind`` says it was made from ({} when it does not say)."""
    p = Path(path)
    if kind == "dataset":
        return read_json_object(p / "manifest.json")
    if kind == "catalogue":
        return read_json_object(p / SYNTH_MARKER)
    if kind == "model":
        return read_json_object(p / "galaxy_llava.json")
    if kind == "eval":
        return read_json_object(p / "metrics.json").get("inputs") or {}
    if kind == "report":
        with open(p, "rb") as f:
            head = f.read(16384).decode("utf-8", "replace")
        m = re.search(rf'<meta name="{REPORT_META}" content="([^"]*)"', head)
        try:
            return json.loads(html.unescape(m.group(1))) if m else {}
        except ValueError:
            return {}
    return {}


def report_meta(identity: dict) -> str:
    """The ``<meta>`` tag that records a report's inputs (read back by :func:`identity_of`)."""
    return (f'<meta name="{REPORT_META}" '
            f'content="{html.escape(json.dumps(identity, sort_keys=True), quote=True)}">')


def differences(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each key of ``new`` whose value ``old`` does not share."""
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]


def _writable_parent(out: Path, flag: str) -> None:
    """One line when ``out`` cannot be created: a parent is a file, or not writable."""
    folder = out.parent if not out.is_dir() else out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: folder {folder} is not writable")


def check_kind(out: str | os.PathLike, kind: str, *, flag: str = "--out",
               overwrite_flag: str = "--overwrite") -> str | None:
    """Refuse, in one line, an ``out`` that holds another kind of thing than ``kind`` (even with
    ``--overwrite``); return what it holds: None, ``"empty"`` or ``kind``. Only a swap cut in
    half by a crash is undone; nothing else changes."""
    out = Path(out)
    recover(out)
    found = kind_of(out)
    if found in (None, "empty"):
        _writable_parent(out, flag)
        return found
    if kind == "report" and found not in ("report", "file"):
        raise UserError(f"{flag} {out} is a folder; a report is one file: name a file such as "
                        f"{out / 'report.html'}")
    if kind != "report" and found in ("file", "report"):
        raise UserError(f"{flag} {out} is a file, not a folder")
    if found == "folder":
        raise UserError(f"{flag} {out} is not empty and holds no {KINDS[kind][2]} from "
                        f"`galaxy-llava {KINDS[kind][3]}`; refusing to write into it (even with "
                        f"{overwrite_flag}): pass a new or empty folder")
    if found != kind:
        raise UserError(f"{flag} {out} holds {KINDS[found][0]}, not {KINDS[kind][0]}; refusing "
                        f"to replace it (even with {overwrite_flag}): choose another {flag}")
    _writable_parent(out, flag)
    return found


def claim(out: str | os.PathLike, kind: str, *, overwrite: bool = False,
          identity: dict | Callable[[Path], list[str]] | None = None, flag: str = "--out",
          overwrite_flag: str = "--overwrite") -> str:
    """Check, before any work, that a command making ``kind`` may write ``out``.

    ``identity``: the inputs the new output is made from (compared with :func:`identity_of`),
    or a function of ``out`` returning the differences. Returns ``"new"`` (nothing there, or an
    empty folder), ``"same"`` (the same kind made from the same inputs: a re-run) or
    ``"replace"`` (a different one, and ``overwrite`` given). Anything else is a one-line
    :class:`UserError`; nothing is changed except undoing a crashed swap."""
    out = Path(out)
    if check_kind(out, kind, flag=flag, overwrite_flag=overwrite_flag) in (None, "empty"):
        return "new"
    if callable(identity):
        diffs = identity(out)
    elif identity:
        diffs = differences(identity_of(out, kind), identity)
    else:
        diffs = ["made by another command or version"]
    if not diffs:
        return "same"
    if overwrite:
        return "replace"
    raise UserError(f"{flag} {out} holds a different {KINDS[kind][1]}: {'; '.join(diffs[:3])}; "
                    f"pass {overwrite_flag} to replace it, or choose another {flag}")


def clean_leftovers(out: str | os.PathLike, inside: bool = True) -> int:
    """Remove what interrupted atomic writes left: ``.<name>.<random>.tmp`` siblings of ``out``
    and, with ``inside``, every temporary under the folder ``out`` (a ``.<x>.old`` whose ``x``
    is missing is put back instead). Returns how many were removed."""
    out = Path(out)
    removed = 0
    if out.parent.is_dir():
        pattern = temp_pattern(out.name)
        for e in os.scandir(out.parent):
            if pattern.match(e.name):
                remove(Path(e.path))
                removed += 1
    if inside and out.is_dir() and not out.is_symlink():
        for folder, dirs, files in os.walk(out):
            for name in [*dirs, *files]:
                if not is_temporary(name):
                    continue
                path = Path(folder) / name
                if name.endswith(".old"):
                    recover(path.with_name(name[1:-len(".old")]))
                    if not path.exists():
                        continue
                remove(path)
                removed += 1
            dirs[:] = [d for d in dirs if not is_temporary(d)]
    return removed


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst`` with hard links (a copy where links are impossible), leaving
    temporaries out. Writers replace files by rename, never in place, so ``src`` stays intact."""
    dst.mkdir()
    for e in os.scandir(src):
        if is_temporary(e.name):
            continue
        s, d = Path(e.path), dst / e.name
        if e.is_dir(follow_symlinks=False):
            _link_tree(s, d)
        elif e.is_symlink():
            os.symlink(os.readlink(s), d)
        else:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, keep: bool = False) -> Iterator[Path]:
    """Build a folder output in a temporary sibling and swap it in whole on success.

    ``keep``: start from (hard links to) what ``out`` holds, so a re-run reuses its files.
    On failure ``out`` is untouched; on success the leftovers of earlier runs are removed.
    Files in the stage must be replaced by rename (``galaxy_llava.io``), never rewritten in
    place: they may share their bytes with ``out``."""
    out = Path(out)
    with atomic_path(out) as stage:
        if keep and out.is_dir():
            _link_tree(out, stage)
        else:
            stage.mkdir()
        yield stage
    clean_leftovers(out)


def write_file(out: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write one file output atomically with ``write(tmp_path)``, then remove leftovers."""
    out = Path(out)
    with atomic_path(out) as tmp:
        write(tmp)
    clean_leftovers(out, inside=False)
    return out
