"""The charts of the HTML report (:mod:`galaxy_llava.report`), as matplotlib figures.

Accuracy per attribute with Wilson 95% error bars, reliability diagrams, and loss curves; one
house style (light grid, no top/right spines, every label at :data:`FONT` points so it stays
readable at the saved size) and one palette of predictor colours. Figures are made with
``matplotlib.figure.Figure``, not pyplot: no global state, no GUI backend, nothing to close.
:func:`png_uri` turns one into the data URI the self-contained report embeds.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

from galaxy_llava.metrics import table_value
from galaxy_llava.morphology import ATTRIBUTES
from galaxy_llava.records import split_name

PALETTE = ("#3b6fb6", "#e07b39", "#3a9a5b", "#c2414b", "#7d5ba6", "#8c6d4f", "#d16aa8", "#6b7b8c")
FONT = 10  # points, for every label of every chart: readable at the saved size (>= 9 pt)


def png_uri(fig) -> str:
    """A figure as a base64 PNG data URI, for an ``<img>`` the report embeds (no file beside
    it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    fig.patch.set_facecolor("white")
    return fig


def _style(ax) -> None:
    """The house style of an axis: light grid, no top/right spines, FONT-sized ticks."""
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=FONT)


def accuracy_figure(views: Sequence[dict]):
    """Grouped bars: accuracy of each attribute (and exact match) per predictor, with Wilson
    95% intervals as error bars; a bar at 0 gets a dark stub and a "0" so it is seen."""
    groups = list(ATTRIBUTES) + ["exact match"]
    fig = _figure(12, 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(len(views), 1)
    for k, v in enumerate(views):
        m = v["metrics"]
        atts = m.get("attributes") or {}
        vals = [table_value(m, a) for a in ATTRIBUTES] + [m.get("exact_match")]
        cis = [(atts.get(a) or {}).get("accuracy_ci") for a in ATTRIBUTES] + \
            [m.get("exact_match_ci")]
        xs = [i + (k - (len(views) - 1) / 2) * width for i in range(len(groups))]
        lo = [val - ci[0] if val is not None and ci else 0 for val, ci in zip(vals, cis)]
        hi = [ci[1] - val if val is not None and ci else 0 for val, ci in zip(vals, cis)]
        ax.bar(xs, [val or 0 for val in vals], width * 0.92, label=v["name"],
               color=v["colour"], yerr=[lo, hi], error_kw={"lw": 0.8, "capsize": 1.5,
                                                           "ecolor": "#444"})
        for x, val in zip(xs, vals):
            if val is None:
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=FONT - 1, rotation=90)
            elif val == 0:
                ax.plot([x - width * 0.46, x + width * 0.46], [0.004, 0.004], color=v["colour"],
                        lw=3, solid_capstyle="butt")
                ax.text(x, 0.012, "0", ha="center", va="bottom", fontsize=FONT - 1)
    ax.set_xticks(range(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy", fontsize=FONT)
    _style(ax)
    ax.legend(ncol=min(len(views), 4), frameon=False, loc="upper center", fontsize=FONT,
              bbox_to_anchor=(0.5, 1.2))
    return fig


def reliability_figure(views: Sequence[dict]):
    """Reliability diagrams, one panel per attribute: for each predictor with probabilities,
    the accuracy of its top label against its confidence in each of the ten bins (dot area ~
    galaxies in the bin); the diagonal is perfect calibration."""
    fig = _figure(12, 6.4)
    axes = fig.subplots(2, 4).ravel()
    for ax, a in zip(axes, ATTRIBUTES):
        ax.plot([0, 1], [0, 1], "--", color="#999", lw=1)
        for v in views:
            rel = (v["metrics"]["calibration"].get(a) or {}).get("reliability") or {}
            pts = [(c, acc, n) for c, acc, n in zip(rel.get("confidence") or [],
                                                    rel.get("accuracy") or [],
                                                    rel.get("count") or []) if n]
            if pts:
                xs, ys, ns = zip(*pts)
                ax.plot(xs, ys, "-", color=v["colour"], lw=1.4)
                ax.scatter(xs, ys, s=[12 + 120 * n / max(ns) for n in ns], color=v["colour"],
                           zorder=3)
        ax.set_title(a.replace("_", " "), fontsize=FONT)
        ax.set_xlim(-0.03, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("confidence", fontsize=FONT)
        ax.set_ylabel("accuracy", fontsize=FONT)
        ax.set_aspect("equal")
        _style(ax)
    legend = axes[-1]
    legend.axis("off")
    for v in views:
        legend.plot([], [], "-o", color=v["colour"], label=v["name"])
    legend.legend(frameon=False, fontsize=FONT, loc="center")
    fig.tight_layout()
    return fig


def loss_figure(runs: Sequence[tuple[str, list[dict], str]]):
    """Training (solid) and validation (dashed, dots) loss against step for each run."""
    fig = _figure(12, 3.4)
    ax = fig.add_subplot()
    for name, loss, colour in runs:
        for split, style in (("train", "-"), ("validation", "--")):
            pts = sorted((r.get("step") or i, r["loss"]) for i, r in enumerate(loss)
                         if split_name(r.get("split") or "train") == split)
            if pts:
                ax.plot(*zip(*pts), style, color=colour,
                        marker="o" if split == "validation" else None,
                        ms=4, lw=1.6 if split == "train" else 1.4, label=f"{name} {split}")
    ax.set_xlabel("optimizer step", fontsize=FONT)
    ax.set_ylabel("loss", fontsize=FONT)
    _style(ax)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=FONT, ncol=2)
    return fig
