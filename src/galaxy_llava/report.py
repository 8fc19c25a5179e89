"""One self-contained HTML report comparing EVAL folders (VLM runs, probe, majority baseline).

Everything is embedded: plots and galaxy thumbnails as base64 PNG/JPEG, CSS inline, no external
URL, so the file can be mailed or opened offline. Sections: headline numbers, a comparison table,
per-attribute accuracy bars, confusion matrices (CSS tabs, no JavaScript), training curves and
speed of each run (when its run folder is known), and a grid of galaxies with truth and every
run's answer, wrong phrases in red and missed ones struck through. Only images inside the EVAL
folders given, or inside the prepared dataset their metrics name, are embedded: a
``predictions.jsonl`` pointing elsewhere on disk gets a placeholder, not the file's bytes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import outputs
from galaxy_llava.checks import inside
from galaxy_llava.errors import UserError
from galaxy_llava.metrics import TABLE_COLUMNS, table_value
from galaxy_llava.morphology import ATTRIBUTES, Morphology, caption_phrases

PALETTE = ("#3b6fb6", "#e07b39", "#3a9a5b", "#c2414b", "#7d5ba6", "#8c6d4f", "#d16aa8", "#6b7b8c")
LOWER_IS_BETTER = {"hallucination_rate", "omission_rate"}
GRID_GALAXIES = 24


# ------------------------------------------------------------------ input

def load_eval(folder: str | Path) -> dict:
    """Metrics and predictions of one EVAL folder; an unfinished or foreign folder is a
    UserError naming it."""
    folder = Path(folder)
    if folder.name == "metrics.json" and folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"EVAL folder {folder} does not exist")
    mfile = folder / "metrics.json"
    if not mfile.is_file():
        raise UserError(f"EVAL folder {folder} has no metrics.json: its evaluation did not finish "
                        f"(rerun galaxy-llava evaluate/probe with --out {folder})")
    try:
        metrics = json.loads(mfile.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mfile} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(metrics, dict) or metrics.get("complete") is not True:
        raise UserError(f"{mfile} is not a finished evaluation (no \"complete\": true)")
    rows = []
    pfile = folder / "predictions.jsonl"
    if pfile.is_file():
        for i, line in enumerate(pfile.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{pfile} line {i} is not valid JSON ({e.msg})") from None
    return {"folder": folder, "metrics": metrics, "rows": rows}


def _read_run(run: str | None) -> dict:
    """train_metrics.json and loss_log.jsonl of a run folder; empty when absent or unreadable."""
    out: dict[str, Any] = {"train_metrics": None, "loss": []}
    if not run or not Path(run).is_dir():
        return out
    try:
        out["train_metrics"] = json.loads((Path(run) / "train_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    try:
        for line in (Path(run) / "loss_log.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
                out["loss"].append(rec)
    except OSError:
        pass
    return out


# ------------------------------------------------------------------ plots

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.patch.set_facecolor("white")
    return fig


def accuracy_chart(evals: Sequence[dict]) -> str:
    """Grouped bars: accuracy of each attribute (and exact match) per run, as a data URI."""
    groups = list(ATTRIBUTES) + ["exact match"]
    fig = _figure(12, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(len(evals), 1)
    for k, ev in enumerate(evals):
        m = ev["metrics"]
        vals = [table_value(m, a) for a in ATTRIBUTES] + [m.get("exact_match")]
        xs = [i + (k - (len(evals) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v or 0 for v in vals], width * 0.92, label=ev["name"],
               color=PALETTE[k % len(PALETTE)])
        for x, v in zip(xs, vals):
            if v is None:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(ncol=min(len(evals), 6), frameon=False, loc="upper center",
              bbox_to_anchor=(0.5, 1.16))
    return _png(fig)


def confusion_chart(metrics: dict) -> str:
    """One heatmap per attribute (rows truth, columns prediction; colour = row share)."""
    fig = _figure(15, 2.9)
    axes = fig.subplots(1, len(ATTRIBUTES))
    for ax, a in zip(axes, ATTRIBUTES):
        att = (metrics.get("attributes") or {}).get(a) or {}
        conf = att.get("confusion") or {}
        labels, matrix = conf.get("labels") or [], conf.get("matrix") or []
        acc = att.get("accuracy")
        ax.set_title(f"{a.replace('_', ' ')}\n" + (f"acc {acc:.0%}, n={att.get('n')}"
                                                   if acc is not None else "n/a"), fontsize=9)
        if not labels:
            ax.axis("off")
            continue
        shares = [[c / max(sum(row), 1) for c in row] for row in matrix]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(matrix):
            for j, c in enumerate(row):
                ax.text(j, i, str(c), ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.6 else "#222")
        short = [lab[:12] for lab in labels]
        ax.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), short, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
    axes[0].set_ylabel("truth", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_chart(runs: Sequence[tuple[str, list[dict], str]]) -> str:
    """Training (solid) and validation (dashed, dots) loss against step for each run."""
    fig = _figure(12, 3.0)
    ax = fig.add_subplot()
    for name, loss, colour in runs:
        for split, style in (("train", "-"), ("val", "--")):
            pts = sorted((r.get("step", i), r["loss"]) for i, r in enumerate(loss)
                         if r.get("split", "train") == split)
            if pts:
                ax.plot(*zip(*pts), style, color=colour, marker="o" if split == "val" else None,
                        ms=4, lw=1.6 if split == "train" else 1.4, label=f"{name} {split}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    return _png(fig)


def image_roots(ev: dict) -> list[Path]:
    """The folders whose images a report may embed for one evaluation: its EVAL folder and the
    prepared dataset (a folder with ``dataset.jsonl``) its metrics name."""
    roots = [Path(ev["folder"]).resolve()]
    data = ev["metrics"].get("data")
    if isinstance(data, str) and data:
        d = Path(data).expanduser()
        d = d.parent if d.name == "dataset.jsonl" else d
        if (d / "dataset.jsonl").is_file():
            roots.append(d.resolve())
    return roots


def _image_path(path: Any, data: Any) -> Path | None:
    """A prediction row's image path, relative ones against the dataset folder."""
    if not isinstance(path, str) or not path:
        return None
    p = Path(path)
    if not p.is_absolute() and isinstance(data, str) and data:
        p = (Path(data) if Path(data).is_dir() else Path(data).parent) / p
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


# ------------------------------------------------------------------ HTML pieces

def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return '<span class="na">n/a</span>'
    if key in ("mean_length", "truth_mean_length") or not isinstance(v, float):
        return f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))
    return f"{100 * v:.1f}%"


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


def _summary_table(evals: Sequence[dict]) -> str:
    cols = [("n", "n")] + list(TABLE_COLUMNS)
    best: dict[str, float] = {}
    for _, key in TABLE_COLUMNS:
        vals = [table_value(e["metrics"], key) for e in evals]
        vals = [v for v in vals if v is not None]
        if len(set(vals)) > 1 and key != "mean_length":  # a tie everywhere marks nothing
            best[key] = min(vals) if key in LOWER_IS_BETTER else max(vals)
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = []
    for k, e in enumerate(evals):
        m = e["metrics"]
        cells = []
        for _, key in cols:
            v = m.get("n") if key == "n" else table_value(m, key)
            win = v is not None and best.get(key) == v
            cells.append(f'<td class="{"best" if win else ""}">{_fmt(v, key)}</td>')
        dot = f'<span class="dot" style="background:{PALETTE[k % len(PALETTE)]}"></span>'
        kind = str(m.get("kind") or "")
        tip = html.escape(f"model: {m.get('model')}; prompt: {m.get('prompt_source', 'n/a')}; "
                          f"folder: {e['folder']}", quote=True)
        body.append(f'<tr><th class="run" title="{tip}">{dot}{html.escape(e["name"])} '
                    f'<span class="kind">{html.escape(kind if kind != e["name"] else "")}'
                    f'</span></th>'
                    + "".join(cells) + "</tr>")
    truth_len = next((e["metrics"].get("truth_mean_length") for e in evals
                      if e["metrics"].get("truth_mean_length")), None)
    note = (f'<p class="note">Accuracy of each attribute is over the galaxies where it applies '
            f'(shape: ellipticals; bar, arms: spirals). Best value per column in green. '
            f'Halluc = share of stated attributes the truth lacks; omission = share of true '
            f'attributes left out. Mean length in words (truth: {_fmt(truth_len, "mean_length")}).'
            f'</p>')
    return f'<table class="summary"><tr><th>run</th>{head}</tr>{"".join(body)}</table>{note}'


def _training_section(evals: Sequence[dict]) -> str:
    runs, rows = [], []
    keys = (("method", ("method",)), ("device", ("device",)), ("precision", ("precision",)),
            ("epochs", ("epochs",)), ("steps", ("steps", "global_step")),
            ("batch", ("batch_size",)), ("wall time", ("wall_seconds", "train_seconds")),
            ("samples/s", ("samples_per_second",)),
            ("trainable params", ("trainable_parameters", "trainable_params")),
            ("final train loss", ("final_train_loss",)), ("final val loss", ("final_val_loss",)))
    for k, e in enumerate(evals):
        info = _read_run(e["metrics"].get("run"))
        tm = dict(info["train_metrics"] or {})
        vals = tm.get("val_losses") or [r for r in info["loss"] if r.get("split") == "val"]
        if vals and isinstance(vals[-1], dict):
            tm.setdefault("final_val_loss", vals[-1].get("loss"))
        if not tm and not info["loss"]:
            continue
        colour = PALETTE[k % len(PALETTE)]
        if info["loss"]:
            runs.append((e["name"], info["loss"], colour))
        cells = []
        for label, cands in keys:
            v = next((tm[c] for c in cands if tm.get(c) is not None), None)
            if label == "wall time" and isinstance(v, (int, float)):
                v = f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"
            elif label == "trainable params" and isinstance(v, (int, float)):
                v = f"{v:,.0f}"
            elif isinstance(v, float):
                v = f"{v:.3g}"
            cells.append(f"<td>{_fmt(v)}</td>")
        rows.append(f"<tr><th class='run'>{html.escape(e['name'])}</th>{''.join(cells)}</tr>")
    if not rows:
        return ('<p class="note">No training runs among these evaluations (or their run folders '
                'are gone), so there are no loss curves.</p>')
    head = "".join(f"<th>{label}</th>" for label, _ in keys)
    chart = f'<img class="plot" src="{loss_chart(runs)}" alt="loss curves">' if runs else ""
    return f'{chart}<table class="summary"><tr><th>run</th>{head}</tr>{"".join(rows)}</table>'


def _galaxy_grid(evals: Sequence[dict], limit: int = GRID_GALAXIES) -> tuple[str, int]:
    """The grid's HTML and how many images were left out for lying outside the folders."""
    by_id = [{r.get("id_str"): r for r in e["rows"] if isinstance(r, dict)} for e in evals]
    first = next((e for e in evals if e["rows"]), None)
    if first is None:
        return '<p class="note">No predictions.jsonl found.</p>', 0
    roots, outside = image_roots(first), 0
    cards = []
    for row in [r for r in first["rows"] if isinstance(r, dict)][:limit]:
        gid = row.get("id_str")
        path = _image_path(row.get("image"), first["metrics"].get("data"))
        if path is not None and not any(inside(path, root) for root in roots):
            outside += 1
            img = '<div class="noimg">image outside the EVAL and data folders: not embedded</div>'
        else:
            src = _thumbnail(path)
            img = (f'<img src="{src}" alt="galaxy {html.escape(str(gid))}">' if src
                   else '<div class="noimg">image missing</div>')
        lines = [f'<div class="truth"><b>truth</b> {html.escape(row.get("truth") or "")}</div>']
        for k, (e, index) in enumerate(zip(evals, by_id)):
            r = index.get(gid)
            if r is None:
                continue
            mark = "✓" if r.get("exact") else "✗"
            lines.append(f'<div class="pred"><span class="tag" style="background:'
                         f'{PALETTE[k % len(PALETTE)]}">{html.escape(e["name"])}</span>'
                         f'<span class="mark {"yes" if r.get("exact") else "no"}">{mark}</span> '
                         f'{marked_answer(r.get("prediction"), r.get("truth_attributes"))}</div>')
        cards.append(f'<div class="card">{img}<div class="txt"><div class="gid">'
                     f'{html.escape(str(gid))}</div>{"".join(lines)}</div></div>')
    return (f'<p class="note">The first {len(cards)} galaxies of the split. ✓ = every attribute '
            f'right. <span class="bad">Red</span>: a wrong or ungrammatical phrase; '
            f'<span class="miss">struck through</span>: a true attribute the answer left out.</p>'
            f'<div class="grid">{"".join(cards)}</div>'), outside


def _confusion_tabs(evals: Sequence[dict]) -> str:
    tabs, panels = [], []
    for k, e in enumerate(evals):
        checked = " checked" if k == 0 else ""
        tabs.append(f'<input type="radio" name="cm" id="cm{k}"{checked}>'
                    f'<label for="cm{k}">{html.escape(e["name"])}</label>')
        panels.append(f'<div class="panel" id="p{k}"><img class="plot" '
                      f'src="{confusion_chart(e["metrics"])}" alt="confusion {k}"></div>')
    css = "".join(f"#cm{k}:checked ~ .panels #p{k}{{display:block}}" for k in range(len(evals)))
    return (f'<style>{css}</style><div class="tabs">{"".join(tabs)}'
            f'<div class="panels">{"".join(panels)}</div></div>'
            f'<p class="note">Rows: truth; columns: prediction; colour: share of the row. '
            f'"unknown": the answer was not a caption (it named no galaxy type), so every '
            f'attribute counts as wrong.</p>')


CSS = """
body{font:15px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2433;
 background:#f3f5f9}
header{background:linear-gradient(120deg,#0b1736,#24386e);color:#fff;padding:26px 40px}
header h1{margin:0 0 4px;font-size:26px;font-weight:600} header p{margin:0;opacity:.8}
main{max-width:1360px;margin:0 auto;padding:10px 30px 40px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px #0002;padding:16px 22px;
 margin:18px 0} h2{font-size:18px;margin:2px 0 12px;color:#24386e}
.kpis{display:flex;gap:14px;flex-wrap:wrap}
.kpi{flex:1;min-width:150px;border-radius:8px;padding:10px 14px;background:#f7f9fc;
 border-top:4px solid var(--c)} .kpi .v{font-size:28px;font-weight:600}
.kpi .l{font-size:12px;color:#5b6478;text-transform:uppercase;letter-spacing:.04em}
table.summary{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
.summary th,.summary td{padding:6px 10px;border-bottom:1px solid #e4e8f0;text-align:right}
.summary th.run,.summary tr:first-child th:first-child{text-align:left;white-space:nowrap} .summary tr:first-child th{background:#eef2f8}
td.best{color:#17803d;font-weight:700} .kind{font-size:11px;color:#7a8396;font-weight:400}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px}
.na{color:#a0a7b5} .note{font-size:13px;color:#5b6478;margin:8px 0 0}
img.plot{max-width:100%;display:block;margin:0 auto}
.tabs input{display:none} .tabs label{display:inline-block;padding:5px 14px;margin:0 4px 8px 0;
 border-radius:16px;background:#eef2f8;cursor:pointer;font-size:13px}
.tabs input:checked+label{background:#24386e;color:#fff} .panel{display:none}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px;
 margin-top:10px}
.card{display:flex;gap:12px;border:1px solid #e4e8f0;border-radius:8px;padding:10px;
 background:#fcfdff} .card img,.noimg{width:132px;height:132px;border-radius:6px;flex:none;
 background:#000} .noimg{color:#aaa;font-size:12px;display:flex;align-items:center;
 justify-content:center}
.txt{font-size:12.5px;min-width:0} .gid{font-size:11px;color:#7a8396;margin-bottom:2px}
.truth{margin-bottom:5px} .pred{margin:3px 0}
.tag{color:#fff;border-radius:3px;padding:0 5px;font-size:11px;margin-right:4px}
.mark.yes{color:#17803d;font-weight:700} .mark.no{color:#c2414b;font-weight:700}
.bad{color:#c62828;font-weight:600;background:#fdecec;border-radius:3px}
.miss{color:#8a93a5;text-decoration:line-through} .extra{color:#a0a7b5;font-style:italic}
"""


def build_report(evals: Sequence[str | Path], out: str | Path = "report.html",
                 overwrite: bool = False) -> Path:
    """Write ONE self-contained HTML file comparing the given EVAL folders; returns its path.

    ``out`` may be new or a report of the same EVAL folders; another report needs
    ``overwrite``, and a folder or any other file is refused."""
    if not evals:
        raise UserError("name at least one EVAL folder to report on")
    identity = {"evals": [str(Path(e).expanduser().resolve()) for e in evals]}
    outputs.claim(out, "report", overwrite=overwrite, identity=identity)
    loaded = [load_eval(e) for e in evals]
    seen: dict[str, int] = {}
    for e in loaded:  # two folders of the same name must stay distinguishable
        base = str(e["metrics"].get("name") or e["folder"].name)
        seen[base] = seen.get(base, 0) + 1
        e["name"] = base if seen[base] == 1 else f"{base} ({seen[base]})"
    splits = sorted({str(e["metrics"].get("split")) for e in loaded})
    kpis = "".join(
        f'<div class="kpi" style="--c:{PALETTE[k % len(PALETTE)]}"><div class="l">'
        f'{html.escape(e["name"])} · exact match</div><div class="v">'
        f'{_fmt(e["metrics"].get("exact_match"))}</div><div class="l">type '
        f'{_fmt(table_value(e["metrics"], "type"))} · n={e["metrics"].get("n")}</div></div>'
        for k, e in enumerate(loaded))
    grid, outside = _galaxy_grid(loaded)
    sections = [
        ("Headline", f'<div class="kpis">{kpis}</div>'),
        ("All metrics", _summary_table(loaded)),
        ("Accuracy per attribute",
         f'<img class="plot" src="{accuracy_chart(loaded)}" alt="accuracy per attribute">'),
        ("Confusion matrices", _confusion_tabs(loaded)),
        ("Training", _training_section(loaded)),
        ("Galaxies: truth and answers", grid),
    ]
    body = "".join(f"<section><h2>{t}</h2>{c}</section>" for t, c in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<title>galaxy-llava report</title>{outputs.report_meta(identity)}'
            f'<style>{CSS}</style></head><body><header>'
            f'<h1>Galaxy Zoo 2 descriptions: evaluation report</h1><p>{len(loaded)} evaluation(s)'
            f' on split {html.escape(", ".join(splits))} · generated '
            f'{datetime.now():%Y-%m-%d %H:%M}</p></header><main>{body}</main></body></html>')
    if outside:
        print(f"warning: {outside} image(s) outside the EVAL folders and their data folder were "
              "not embedded", file=sys.stderr)
    return outputs.write_file(out, lambda tmp: tmp.write_text(page))
