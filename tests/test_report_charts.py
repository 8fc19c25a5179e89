"""The report's charts: every label readable at the saved size, and a bar at 0 still seen."""

from __future__ import annotations

from galaxy_llava.metrics import score_captions
from galaxy_llava.morphology import Morphology
from galaxy_llava.report import load_eval
from galaxy_llava.report_charts import accuracy_figure, loss_figure, reliability_figure
from test_report import _make_evals


def _texts(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    FigureCanvasAgg(fig).draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_charts_are_readable_and_show_bars_at_zero(tmp_path):
    loaded = [load_eval(e) for e in _make_evals(tmp_path)]
    views = [{"name": e["metrics"]["name"], "metrics": e["metrics"], "colour": "#3b6fb6"}
             for e in loaded]
    views.append({**views[0], "name": "lora (grammar)",
                  "metrics": views[0]["metrics"]["grammar"]})
    loss = [{"step": s, "loss": 1 / s, "split": "train"} for s in range(1, 5)]
    for fig in (accuracy_figure(views),
                reliability_figure([v for v in views if v["metrics"].get("calibration")]),
                loss_figure([("lora", loss, "#3b6fb6")])):
        texts = _texts(fig)
        assert texts and min(t.get_fontsize() for t in texts) >= 9
    # an empty answer is wrong on everything: each bar is 0 and must still be seen
    empty = {"name": "empty", "colour": "#e07b39",
             "metrics": score_captions([Morphology("spiral")], [""])}
    ax = accuracy_figure([empty]).axes[0]
    labels = [t.get_text() for t in ax.texts]
    # 6 attributes and exact match at 0; shape does not apply to a spiral: "n/a"
    assert labels.count("0") == 7 and labels.count("n/a") == 1
    stubs = [line for line in ax.lines if line.get_color() == "#e07b39"]
    assert len(stubs) == 7 and all(0 < min(line.get_ydata()) < 0.02 for line in stubs)
