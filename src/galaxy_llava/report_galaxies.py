"""The report's grid of galaxies: each a thumbnail with its true caption and every predictor's
answer, the phrases marked right, wrong (or outside the caption grammar) and left out.

Answers are read exactly as the metrics read them
(:func:`galaxy_llava.morphology.caption_phrases`), so a phrase shown right is one the metrics
count right. Thumbnails are embedded as JPEG data URIs, and only images inside the EVAL folder or
the prepared dataset its metrics name (:func:`image_roots`): a ``predictions.jsonl`` pointing
elsewhere on disk gets a placeholder, not the file's bytes. The rows are checked as they are
read (:func:`check_row`), so a malformed one is a one-line error, not a crash mid-report.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava.checks import inside
from galaxy_llava.errors import UserError
from galaxy_llava.morphology import Morphology, caption_phrases
from galaxy_llava.records import dataset_folder

GRID_GALAXIES = 24


def data_of(metrics: dict) -> Any:
    """The dataset an evaluation's metrics name, as an absolute path where they have one (EVAL
    folders written before ``data`` was stored absolute keep it as typed, and their ``inputs``
    absolute), so a report finds it from any working directory."""
    data = metrics.get("data")
    if isinstance(data, str) and not Path(data).is_absolute():
        inputs = metrics.get("inputs")
        recorded = inputs.get("data") if isinstance(inputs, dict) else None
        return recorded if isinstance(recorded, str) and recorded else data
    return data


def image_roots(ev: dict) -> list[Path]:
    """The folders whose images a report may embed for one evaluation: its EVAL folder and the
    prepared dataset (a folder with ``dataset.jsonl``) its metrics name."""
    roots = [Path(ev["folder"]).resolve()]
    data = data_of(ev["metrics"])
    if isinstance(data, str) and data:
        d = dataset_folder(data)
        if (d / "dataset.jsonl").is_file():
            roots.append(d.resolve())
    return roots


# The fields of a predictions.jsonl row the grid of galaxies reads, and the types they must have
# when present (evaluate writes them so; a hand-edited or foreign file may not).
_ROW_FIELDS = {"id_str": ((str, int), "a string or a number"), "truth": (str, "a string"),
               "prediction": (str, "a string")}


def check_row(row: Any, where: str) -> None:
    """A ``predictions.jsonl`` row the report can show, else a one-line UserError naming
    ``where`` (file and line): an object, texts as strings, ``truth_attributes`` a valid
    :class:`~galaxy_llava.morphology.Morphology` and ``grammar`` an object."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a prediction row must be a JSON object "
                        f"(got {type(row).__name__})")
    for key, (kinds, what) in _ROW_FIELDS.items():
        if row.get(key) is not None and not isinstance(row[key], kinds):
            raise UserError(f"{where}: {key!r} must be {what} (got {type(row[key]).__name__})")
    truth = row.get("truth_attributes")
    if truth is not None:
        if not isinstance(truth, dict):
            raise UserError(f"{where}: 'truth_attributes' must be an object of morphology "
                            f"attributes (got {type(truth).__name__})")
        try:
            Morphology.from_dict(truth)
        except (TypeError, ValueError) as e:
            detail = " ".join(str(e).split())  # one line, whatever the message
            raise UserError(f"{where}: 'truth_attributes' is not a valid morphology "
                            f"({detail})") from None
    grammar = row.get("grammar")
    if grammar is not None:
        best = grammar.get("best") if isinstance(grammar, dict) else None
        if not isinstance(grammar, dict) or not isinstance(best, (str, type(None))):
            raise UserError(f"{where}: 'grammar' must be an object whose 'best' is a string")


def _image_path(path: Any, data: Any) -> Path | None:
    """A prediction row's image path, relative ones against the dataset folder."""
    if not isinstance(path, str) or not path:
        return None
    p = Path(path)
    if not p.is_absolute() and isinstance(data, str) and data:
        p = dataset_folder(data) / p
    return p


def _thumbnail(p: Path | None, size: int = 132) -> str | None:
    """A JPEG data URI of one galaxy image, or None when it cannot be read."""
    from PIL import Image

    if p is None:
        return None
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            if im.width < size:  # small training images: upscale so they are visible
                im = im.resize((size, size), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def marked_answer(text: str | None, truth: dict | None) -> str:
    """HTML of an answer with each phrase marked right (plain), wrong or outside the grammar
    (red), and the truth's phrases it left out (struck through, grey)."""
    text = text or ""
    if len(text) > 240:  # runaway generations would swamp the grid
        text = text[:240] + "…"
    if truth is None:
        return html.escape(text) or '<span class="na">(empty)</span>'
    t = Morphology.from_dict(truth)
    # Read as metrics reads it (morphology.caption_phrases): a phrase is right only where the
    # grammar reads it and the truth agrees.
    phrases, rest = caption_phrases(text)
    if len(phrases) == 1 and not phrases[0].text:  # nothing before the full stop
        phrases = []
    parts, said = [], {}
    for p in phrases:
        ok = p.attribute is not None and getattr(t, p.attribute) == p.value
        if p.attribute is not None:
            said[p.attribute] = p.value
        parts.append(f'<span class="{"ok" if ok else "bad"}">{html.escape(p.text)}</span>')
    missing = [p.text for p in t.phrases()[1:]
               if p.attribute not in said or said[p.attribute] != p.value]
    out = ", ".join(parts) or '<span class="bad">(empty answer)</span>'
    if rest.strip():
        out += f'. <span class="extra">{html.escape(rest.strip()[:120])}</span>'
    if missing:
        out += " " + " ".join(f'<span class="miss">{html.escape(p)}</span>' for p in missing)
    return out


def galaxy_grid(evals: Sequence[dict], limit: int = GRID_GALAXIES) -> tuple[str, int]:
    """The galaxies section: the first ``limit`` galaxies of the first evaluation with
    predictions, each a thumbnail, its true caption and every predictor's answer marked
    (:func:`marked_answer`); returns its HTML and how many images were left out for lying
    outside the folders (:func:`image_roots`)."""
    by_id = [{r.get("id_str"): r for r in e["rows"] if isinstance(r, dict)} for e in evals]
    first = next((e for e in evals if e["rows"]), None)
    if first is None:
        return '<p class="note">No predictions.jsonl found.</p>', 0
    roots, outside = image_roots(first), 0
    cards = []
    for row in [r for r in first["rows"] if isinstance(r, dict)][:limit]:
        gid = row.get("id_str")
        path = _image_path(row.get("image"), data_of(first["metrics"]))
        if path is not None and not any(inside(path, root) for root in roots):
            outside += 1
            img = '<div class="noimg">image outside the EVAL and data folders: not embedded</div>'
        else:
            src = _thumbnail(path)
            img = (f'<img src="{src}" alt="galaxy {html.escape(str(gid))}">' if src
                   else '<div class="noimg">image missing</div>')
        lines = [f'<div class="truth"><b>truth</b> {html.escape(row.get("truth") or "")}</div>']
        for e, index in zip(evals, by_id):
            r = index.get(gid)
            if r is None:
                continue
            answers = [(e["name"], e["colour"], r.get("exact"), r.get("prediction"))]
            g = r.get("grammar")
            if isinstance(g, dict) and e.get("grammar_colour"):
                answers.append((f'{e["name"]} (grammar)', e["grammar_colour"], g.get("exact"),
                                g.get("best")))
            for name, colour, exact, text in answers:
                lines.append(f'<div class="pred"><span class="tag" style="background:{colour}">'
                             f'{html.escape(name)}</span><span class="mark '
                             f'{"yes" if exact else "no"}">{"✓" if exact else "✗"}</span> '
                             f'{marked_answer(text, r.get("truth_attributes"))}</div>')
        cards.append(f'<div class="card">{img}<div class="txt"><div class="gid">'
                     f'{html.escape(str(gid))}</div>{"".join(lines)}</div></div>')
    return (f'<p class="note">The first {len(cards)} galaxies of the split. ✓ = every attribute '
            f'right. <span class="bad">Red</span>: a wrong or ungrammatical phrase; '
            f'<span class="miss">struck through</span>: a true attribute the answer left out.</p>'
            f'<div class="grid">{"".join(cards)}</div>'), outside
