"""One self-contained HTML report comparing EVAL folders (VLM runs, probe, majority baseline).

Everything is embedded: plots and galaxy thumbnails as base64 PNG/JPEG, CSS inline, no external
URL, so the file can be mailed or opened offline. Sections: headline numbers, a comparison table,
per-attribute accuracy bars with Wilson 95% intervals, calibration (numbers and reliability
diagrams of every predictor with probabilities), confusion matrices (CSS tabs, no JavaScript),
the settings of each evaluation, training curves and speed of each run, and a grid of galaxies
with truth and every run's answer, wrong phrases in red and missed ones struck through.

A VLM evaluation with grammar scores is two predictors: beam search ("NAME") and the grammar's
most probable caption ("NAME (grammar)"). Training details come from the snapshot the EVAL
folder took at evaluation time (``metrics.json`` ``training``), so resuming the run later does
not change the report; folders from before the snapshot fall back to reading the run folder.
The charts are :mod:`galaxy_llava.report_charts`'s; the grid of galaxies (which embeds only
images inside the EVAL folders or their prepared dataset) is :mod:`galaxy_llava.report_galaxies`'s.
"""

from __future__ import annotations

import html
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from galaxy_llava import outputs
from galaxy_llava.errors import UserError
from galaxy_llava.metrics import TABLE_COLUMNS, predictors, table_value
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import split_name
from galaxy_llava.report_charts import (PALETTE, accuracy_figure, loss_figure, png_uri,
                                        reliability_figure)
from galaxy_llava.report_galaxies import check_row, galaxy_grid
from galaxy_llava.run_layout import training_snapshot

LOWER_IS_BETTER = {"hallucination_rate", "omission_rate"}
KIND_ORDER = ("vlm", "probe", "majority")


# ------------------------------------------------------------------ input

def load_eval(folder: str | Path) -> dict:
    """Metrics and predictions of one EVAL folder; an unfinished or foreign folder, or a
    ``predictions.jsonl`` row the report cannot show (``report_galaxies.check_row``), is a
    UserError naming the folder or the file and line."""
    folder = Path(folder)
    if folder.name == "metrics.json" and folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"EVAL folder {folder} does not exist")
    mfile = folder / "metrics.json"
    if not mfile.is_file():
        raise UserError(f"EVAL folder {folder} has no metrics.json (nor EVAL folders inside): "
                        f"its evaluation did not finish (rerun galaxy-llava evaluate/probe with "
                        f"--out {folder})")
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
                check_row(rows[-1], f"{pfile} line {i}")
    return {"folder": folder, "metrics": metrics, "rows": rows}


def eval_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The EVAL folders to report on: each path that is one (it has ``metrics.json``, or is
    that file) as given; a folder that is not one but holds EVAL folders (``demo-out/eval``)
    stands for those, VLMs first, then probes and majority baselines, each in the order they
    were evaluated. Anything else is kept, for :func:`load_eval` to name."""
    out: list[Path] = []
    for p in map(Path, paths):
        kids = [] if (p / "metrics.json").is_file() or not p.is_dir() else \
            [k for k in p.iterdir() if (k / "metrics.json").is_file()]
        if not kids:
            out.append(p)
            continue

        def order(k: Path) -> tuple:
            try:
                kind = json.loads((k / "metrics.json").read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
            return rank, (k / "metrics.json").stat().st_mtime, k.name

        out += sorted(kids, key=order)
    return out


def training_of(metrics: dict) -> tuple[dict | None, bool]:
    """(the training snapshot of an evaluation, whether it was read live): the one
    ``metrics.json`` recorded at evaluation time, or for a folder from before snapshots the
    run folder as it is now."""
    if "training" in metrics:
        return metrics["training"] if isinstance(metrics["training"], dict) else None, False
    if metrics.get("run"):
        return training_snapshot(metrics["run"]), True
    return None, False


# ------------------------------------------------------------------ HTML pieces

def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return '<span class="na">n/a</span>'
    if key in ("mean_length", "truth_mean_length") or not isinstance(v, float):
        return f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))
    return f"{100 * v:.1f}%"


def _summary_table(views: Sequence[dict]) -> str:
    cols = [("n", "n")] + list(TABLE_COLUMNS)
    best: dict[str, float] = {}
    for _, key in TABLE_COLUMNS:
        vals = [table_value(v["metrics"], key) for v in views]
        vals = [x for x in vals if x is not None]
        if len(set(vals)) > 1 and key != "mean_length":  # a tie everywhere marks nothing
            best[key] = min(vals) if key in LOWER_IS_BETTER else max(vals)
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in cols)
    body = []
    for v in views:
        m, top = v["metrics"], v["eval"]["metrics"]
        cells = []
        for _, key in cols:
            x = m.get("n") if key == "n" else table_value(m, key)
            win = x is not None and best.get(key) == x
            cells.append(f'<td class="{"best" if win else ""}">{_fmt(x, key)}</td>')
        kind = str(top.get("kind") or "")
        tip = html.escape(f"model: {top.get('model')}; prompt: {top.get('prompt_source', 'n/a')}; "
                          f"folder: {v['eval']['folder']}", quote=True)
        body.append(f'<tr><th class="run" title="{tip}">{_dot(v)}{html.escape(v["name"])} '
                    f'<span class="kind">{html.escape(kind if kind != v["name"] else "")}'
                    f'</span></th>' + "".join(cells) + "</tr>")
    truth_len = next((v["metrics"].get("truth_mean_length") for v in views
                      if v["metrics"].get("truth_mean_length")), None)
    note = (f'<p class="note">Accuracy of each attribute is over the galaxies where it applies '
            f'(shape: ellipticals; bar, arms: spirals). Best value per column in green. '
            f'Exact = all seven attributes right; parse = share of answers wholly inside the '
            f'caption grammar; halluc = share of stated attributes the truth lacks; omission = '
            f'share of true attributes left out. "(grammar)": the most probable caption of the '
            f'grammar instead of beam search. Mean length in words (truth: '
            f'{_fmt(truth_len, "mean_length")}).</p>')
    return f'<table class="summary"><tr><th>run</th>{head}</tr>{"".join(body)}</table>{note}'


def _dot(view: dict) -> str:
    return f'<span class="dot" style="background:{view["colour"]}"></span>'


def _num(v: Any, digits: int = 3) -> str:
    return '<span class="na">n/a</span>' if v is None else f"{v:.{digits}f}"


MAIN_ATTRIBUTES = ("type", "shape", "bar", "arms")


def _calibration_section(views: Sequence[dict]) -> str:
    """Per predictor and attribute: accuracy with its Wilson interval, macro-F1 and (for
    predictors with probabilities) Brier, ECE, AUROC and the vote-fraction MSE; then the
    reliability diagrams."""
    def rows(attributes: Sequence[str]) -> str:
        out = []
        for a in attributes:
            for v in views:
                att = (v["metrics"].get("attributes") or {}).get(a) or {}
                cal = (v["metrics"].get("calibration") or {}).get(a) or {}
                ci = att.get("accuracy_ci")
                acc = _fmt(att.get("accuracy")) + (
                    f' <span class="ci">[{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%]</span>'
                    if ci else "")
                out.append(f"<tr><th class='run'>{_dot(v)}{html.escape(v['name'])}</th>"
                           f"<td class='left'>{a.replace('_', ' ')}</td><td>{att.get('n', '')}</td>"
                           f"<td>{acc}</td><td>{_num(att.get('macro_f1'))}</td>"
                           f"<td>{_num(cal.get('brier'))}</td><td>{_num(cal.get('ece'))}</td>"
                           f"<td>{_num(cal.get('auroc'))}</td>"
                           f"<td>{_num(cal.get('vote_mse'), 4)}</td></tr>")
        return "".join(out)

    head = ("<tr><th>predictor</th><th class='left'>attribute</th><th>n</th>"
            "<th>accuracy [95% CI]</th>"
            "<th>macro-F1</th><th>Brier</th><th>ECE</th><th>AUROC</th><th>vote MSE</th></tr>")
    rest = [a for a in ATTRIBUTES if a not in MAIN_ATTRIBUTES]
    table = (f'<table class="summary">{head}{rows(MAIN_ATTRIBUTES)}</table>'
             f'<details><summary>the other attributes</summary><table class="summary">{head}'
             f'{rows(rest)}</table></details>')
    calibrated = [v for v in views if v["metrics"].get("calibration")]
    chart = (f'<img class="plot" src="{png_uri(reliability_figure(calibrated))}" '
             f'alt="reliability diagrams">' if calibrated else
             '<p class="note">No evaluation here has probabilities (evaluate ran with '
             '--no-scores), so there are no reliability diagrams.</p>')
    note = ('<p class="note">Accuracy with its Wilson 95% interval. Probabilities: the VLM\'s '
            'posterior over the grammar\'s captions summed per attribute ("(grammar)" rows), '
            'the probe\'s logistic regressions (of the labels; "(votes)" rows: of each GZ2 '
            'question\'s vote fractions, Zoobot-lite), the majority\'s training-set '
            'frequencies. '
            'Brier: mean over galaxies of the summed squared error of the label probabilities '
            '(0 best, 2 worst). ECE: top-label expected calibration error over ten equal-width '
            'confidence bins (0 = the confidence is the accuracy). AUROC: binary, on p(yes), '
            'for the yes/no attributes; one-vs-rest and macro-averaged over the true labels for '
            'type, shape and arms (n/a with one label); galaxies ranked by log-odds, so '
            'probabilities saturated at 1.0 do not tie. Vote MSE (Zoobot\'s): squared error of '
            'each GZ2-answered label\'s probability given that its question is asked (p(bar | '
            'spiral), ...) against the volunteers\' vote fraction (elliptical ~ smooth, bar ~ '
            'bar yes, ...), over every galaxy at least half of whose volunteers were asked the '
            'question.</p>')
    return table + chart + note


def _code(text: Any) -> str:
    return f"<code>{html.escape(str(text))}</code>"


def _settings_section(evals: Sequence[dict]) -> str:
    """What each evaluation ran with: model, rules, prompt, decoding and the training settings
    (the snapshot taken at evaluation time)."""
    keys = ("kind", "model", "rules", "prompt", "decoding", "method", "learning rate",
            "epochs", "LoRA rank", "seed")
    rows, live = [], []
    for e in evals:
        m = e["metrics"]
        snap, was_live = training_of(m)
        if was_live:
            live.append(e["name"])
        t = (snap or {}).get("settings") or {}
        gen = m.get("generation") or {}
        beams = gen.get("num_beams")
        decoding = (f"beam search ({beams} beam{'s' if beams != 1 else ''}), at most "
                    f"{gen.get('max_new_tokens')} new tokens" if gen else None)
        if gen and m.get("grammar"):
            decoding += "; grammar scores"
        lr = t.get("learning_rate")
        vals = (m.get("kind"), m.get("model"), m.get("rules"), m.get("prompt"), decoding,
                t.get("method"), f"{lr:.3g}" if isinstance(lr, (int, float)) else lr,
                t.get("epochs") if t.get("epochs") is not None else t.get("max_steps"),
                t.get("lora_r"), t.get("seed"))
        cells = "".join(f"<td class='left'>{_code(x) if k == 'prompt' and x else _fmt(x)}</td>"
                        for k, x in zip(keys, vals))
        rows.append(f"<tr><th class='run'>{html.escape(e['name'])}</th>{cells}</tr>")
    head = "".join(f"<th class='left'>{k}</th>" for k in keys)
    note = ("Training settings as recorded when each evaluation ran (the run folder may have "
            "changed since).")
    if live:
        note += (" Read from the run folder as it is now, for evaluations made before that "
                 f"record existed: {html.escape(', '.join(live))}.")
    return (f'<table class="summary"><tr><th>evaluation</th>{head}</tr>{"".join(rows)}</table>'
            f'<p class="note">{note}</p>')


def _training_section(evals: Sequence[dict]) -> str:
    runs, rows = [], []
    keys = (("method", ("method",)), ("device", ("device",)), ("precision", ("precision",)),
            ("epochs", ("epochs",)), ("steps", ("steps", "global_step")),
            ("batch", ("batch_size",)), ("wall time", ("wall_seconds", "train_seconds")),
            ("samples/s", ("samples_per_second",)),
            ("trainable params", ("trainable_parameters", "trainable_params")),
            ("final train loss", ("final_train_loss",)), ("final val loss", ("final_val_loss",)))
    for k, e in enumerate(evals):
        snap, _ = training_of(e["metrics"])
        snap = snap or {}
        loss = [r for r in snap.get("loss") or [] if isinstance(r, dict)
                and isinstance(r.get("loss"), (int, float))]
        tm = dict(snap.get("train_metrics") or {})
        vals = tm.get("val_losses") or [r for r in loss
                                        if split_name(r.get("split") or "") == "validation"]
        if vals and isinstance(vals[-1], dict):
            tm.setdefault("final_val_loss", vals[-1].get("loss"))
        if not tm and not loss:
            continue
        if loss:
            runs.append((e["name"], loss, e["colour"]))
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
    chart = (f'<img class="plot" src="{png_uri(loss_figure(runs))}" alt="loss curves">'
             if runs else "")
    return f'{chart}<table class="summary"><tr><th>run</th>{head}</tr>{"".join(rows)}</table>'


def confusion_tables(metrics: dict) -> str:
    """One small HTML table per attribute (rows truth, columns prediction, the counts shaded by
    their share of the row): text at the page's size, and no image to render."""
    out = []
    for a in ATTRIBUTES:
        att = (metrics.get("attributes") or {}).get(a) or {}
        conf = att.get("confusion") or {}
        labels, matrix = conf.get("labels") or [], conf.get("matrix") or []
        acc = att.get("accuracy")
        title = (f"<b>{a.replace('_', ' ')}</b> " + (f"acc {acc:.0%}, n={att.get('n')}"
                                                      if acc is not None else "n/a"))
        if not labels:
            out.append(f'<div class="cm">{title}</div>')
            continue
        head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
        rows = []
        for lab, row in zip(labels, matrix):
            cells = []
            for c in row:
                share = c / max(sum(row), 1)
                ink = "#fff" if share > 0.6 else "#222"
                cells.append(f'<td style="background:rgba(36,56,110,{share:.2f});color:{ink}">'
                             f"{c}</td>")
            rows.append(f"<tr><th>{html.escape(lab)}</th>{''.join(cells)}</tr>")
        out.append(f'<div class="cm">{title}<table><tr><th>truth \\ predicted</th>{head}</tr>'
                   f'{"".join(rows)}</table></div>')
    return f'<div class="cms">{"".join(out)}</div>'


def _confusion_tabs(views: Sequence[dict]) -> str:
    tabs, panels = [], []
    for k, v in enumerate(views):
        checked = " checked" if k == 0 else ""
        tabs.append(f'<input type="radio" name="cm" id="cm{k}"{checked}>'
                    f'<label for="cm{k}">{html.escape(v["name"])}</label>')
        panels.append(f'<div class="panel" id="p{k}">{confusion_tables(v["metrics"])}</div>')
    css = "".join(f"#cm{k}:checked ~ .panels #p{k}{{display:block}}" for k in range(len(views)))
    return (f'<style>{css}</style><div class="tabs">{"".join(tabs)}'
            f'<div class="panels">{"".join(panels)}</div></div>'
            f'<p class="note">Rows: truth; columns: prediction; shade: share of the row. '
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
.warn{color:#9a4b00;background:#fff4e0;border-radius:6px;padding:6px 10px;font-size:14px}
.bad{color:#c62828;font-weight:600;background:#fdecec;border-radius:3px}
.miss{color:#8a93a5;text-decoration:line-through} .extra{color:#a0a7b5;font-style:italic}
.ci{color:#7a8396;font-size:12px} .summary td.left,.summary th.left{text-align:left}
.summary code{white-space:pre-wrap;font-size:12px} details{margin-top:8px;font-size:14px}
.cms{display:flex;flex-wrap:wrap;gap:14px 22px} .cm{font-size:13px}
.cm table{border-collapse:collapse;margin-top:4px;font-variant-numeric:tabular-nums}
.cm td,.cm th{border:1px solid #e4e8f0;padding:3px 8px;text-align:center;font-size:13px}
.cm th{background:#f7f9fc;font-weight:500}
"""


def _views(evals: Sequence[dict]) -> list[dict]:
    """Every predictor of these evaluations (:func:`galaxy_llava.metrics.predictors`: a VLM
    with grammar scores is two), each ``{"name", "metrics", "eval", "colour"}``; an
    evaluation's colours are stored on it for the grid."""
    out = []
    for e in evals:
        for name, m in predictors([{**e["metrics"], "name": e["name"]}]):
            colour = PALETTE[len(out) % len(PALETTE)]
            sub = next((k for k in ("grammar", "votes") if m is e["metrics"].get(k)), None)
            e[f"{sub}_colour" if sub else "colour"] = colour
            out.append({"name": name, "metrics": m, "eval": e, "colour": colour})
    return out


def build_report(evals: Sequence[str | Path], out: str | Path = "report.html", *,
                 overwrite: bool = False) -> Path:
    """Write ONE self-contained HTML file comparing the given EVAL folders (or the EVAL folders
    inside a parent folder, :func:`eval_folders`); returns its path.

    ``out`` may be new or a report of the same EVAL folders; another report needs
    ``overwrite``, and a folder or any other file is refused."""
    if not evals:
        raise UserError("name at least one EVAL folder to report on")
    folders = eval_folders(evals)
    identity = {"evals": [str(Path(e).expanduser().resolve()) for e in folders]}
    outputs.claim(out, "report", overwrite=overwrite, identity=identity)
    loaded = [load_eval(e) for e in folders]
    seen: dict[str, int] = {}
    for e in loaded:  # two folders of the same name must stay distinguishable
        base = str(e["metrics"].get("name") or e["folder"].name)
        seen[base] = seen.get(base, 0) + 1
        e["name"] = base if seen[base] == 1 else f"{base} ({seen[base]})"
    views = _views(loaded)
    splits = sorted({str(e["metrics"].get("split")) for e in loaded})
    kpis = "".join(
        f'<div class="kpi" style="--c:{v["colour"]}"><div class="l">'
        f'{html.escape(v["name"])} · exact match</div><div class="v">'
        f'{_fmt(v["metrics"].get("exact_match"))}</div><div class="l">type '
        f'{_fmt(table_value(v["metrics"], "type"))} · n={v["metrics"].get("n")}</div></div>'
        for v in views)
    grid, outside = galaxy_grid(loaded)
    warnings = "".join(f'<p class="warn">{html.escape(v["name"])}: {html.escape(w)}</p>'
                       for v in views if (w := v["metrics"].get("collapse_warning")))
    sections = [
        ("Headline", f'<div class="kpis">{kpis}</div>{warnings}'),
        ("All metrics", _summary_table(views)),
        ("Accuracy per attribute",
         f'<img class="plot" src="{png_uri(accuracy_figure(views))}" '
         'alt="accuracy per attribute">'
         '<p class="note">Error bars: Wilson 95% confidence intervals.</p>'),
        ("Calibration", _calibration_section(views)),
        ("Confusion matrices", _confusion_tabs(views)),
        ("Settings", _settings_section(loaded)),
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
