"""Simulated Galaxy Zoo 2 volunteer votes for a synthetic galaxy's drawn truth (synthetic.py).

~45 volunteers walk the GZ2 decision tree (:mod:`galaxy_llava.gz2`; a question is asked only of
those whose earlier answers lead to it); each picks the true answer with a per-question clarity,
else one it is plausibly mistaken for (:data:`ORDINAL`). The clarity depends on the rendered
picture (:func:`clarity`): as in GZ2, faint, small, noisy and inclined galaxies split the votes
more, so how much volunteers disagree is something a model can learn to see.
:func:`unanimous_votes` is the noise-free limit: every volunteer right.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from galaxy_llava import gz2


def _p(answers: tuple, true: str, c: float, confusion: dict | None = None) -> np.ndarray:
    """Probabilities over ``answers``: ``c`` on the true one, the rest shared by confusion weights."""
    w = np.array([0.0 if a == true else (confusion or {}).get(a, 0.0 if confusion else 1.0)
                  for a in answers])
    return np.where(np.array(answers) == true, c, (1 - c) * w / w.sum())


ORDINAL = {  # the answers a volunteer mistakes each true answer for, with their weights
    "how-rounded": {"round": {"in-between": 0.9, "cigar": 0.1},
                    "in-between": {"round": 0.5, "cigar": 0.5},
                    "cigar": {"in-between": 0.9, "round": 0.1}},
    "bulge-size": {"dominant": {"obvious": 0.8, "just-noticeable": 0.2},
                   "obvious": {"dominant": 0.3, "just-noticeable": 0.6, "no": 0.1},
                   "just-noticeable": {"obvious": 0.45, "no": 0.45, "dominant": 0.1},
                   "no": {"just-noticeable": 0.8, "obvious": 0.15, "dominant": 0.05}},
    "bulge-shape": {"round": {"boxy": 0.4, "no-bulge": 0.6}, "boxy": {"round": 0.8, "no-bulge": 0.2},
                    "no-bulge": {"round": 0.8, "boxy": 0.2}},
    "spiral-winding": {"tight": {"medium": 0.8, "loose": 0.2}, "medium": {"tight": .5, "loose": .5},
                       "loose": {"medium": 0.8, "tight": 0.2}},
    "spiral-arm-count": {"2": {"1": .2, "3": .35, "4": .1, "more-than-4": .05, "cant-tell": .3},
                         "3": {"1": .05, "2": .35, "4": .3, "more-than-4": .1, "cant-tell": .2},
                         "more-than-4": {"2": .05, "3": .15, "4": .4, "cant-tell": .4},
                         "cant-tell": {"1": .2, "2": .4, "3": .2, "4": .1, "more-than-4": .1}},
    "smooth-or-featured": {"smooth": {"featured-or-disk": 0.85, "artifact": 0.15},
                           "featured-or-disk": {"smooth": 0.9, "artifact": 0.1},
                           "artifact": {"smooth": 0.6, "featured-or-disk": 0.4}},
}


def true_answers(truth: dict) -> dict[str, str]:
    """The answer to every GZ2 question that a volunteer who sees this truth clearly gives, also
    for questions off the galaxy's branch (asked only of volunteers who strayed onto it)."""
    kind, bulge = truth["type"], truth["bulge"]
    looks = ("cigar" if kind == "edge-on disk" or truth["artifact"] == "trail"
             else "round" if (truth["axis_ratio"] or 1) > 0.8 else "in-between")
    return {
        "smooth-or-featured": {"elliptical": "smooth", "artifact": "artifact"}.get(kind,
                                                                                  "featured-or-disk"),
        "how-rounded": truth["shape"] or looks,
        "disk-edge-on": "yes" if kind == "edge-on disk" else "no",
        "bulge-shape": "no-bulge" if bulge == "no" else "boxy" if truth["boxy"] else "round",
        "bar": "yes" if truth["bar"] else "no",
        "has-spiral-arms": "yes" if truth["arms"] else "no",
        "spiral-winding": truth["winding"] or "medium",
        "spiral-arm-count": {"2": "2", "3": "3", "many": "more-than-4"}.get(truth["arms"], "cant-tell"),
        "bulge-size": {"elliptical": "dominant", "artifact": "no"}.get(kind, bulge),
        "something-odd": "yes" if truth["disturbed"] else "no",
    }


# How the picture sets the clarity (see clarity()): the most a galaxy can have; clarity lost per
# dex of surface brightness over the noise below SNR_CLEAR, per dex of size over the seeing below
# RES_CLEAR, and per unit of a disk's 1 - axis ratio; the least it can have. Over the synthetic
# mix they give a mean clarity of 0.84 (5-95%: 0.76-0.93; spirals 0.80, edge-on disks 0.80,
# ellipticals 0.87, artifacts 0.96), measured over 600 galaxies of seed 7.
CLEAREST, LEAST_CLEAR = 0.96, 0.6
SNR_CLEAR, FAINT = 10 ** 1.8, 0.15
RES_CLEAR, SMALL = 15.0, 0.15
INCLINED = 0.15


def picture_measures(truth: dict) -> dict[str, float]:
    """What a volunteer's view of the rendered galaxy depends on, from ``truth["render"]`` (set
    by :func:`galaxy_llava.toy.synthetic.render`; lengths in pixels of a 424 px GZ2 cutout, the
    image volunteers saw, whatever size the catalogue's images are):

    * ``snr``: the mean surface brightness inside the half-light radius (half the flux over the
      ellipse of that radius and the galaxy's axis ratio) over the sky noise per pixel;
    * ``resolution``: the half-light radius over the seeing (PSF FWHM);
    * ``axis_ratio``: the apparent minor/major axis ratio (1 for artifacts)."""
    r = truth.get("render")
    if not r:
        raise ValueError("votes depend on the picture: render the galaxy first "
                         "(synthetic.render sets truth['render'])")
    q = r.get("q") or truth.get("axis_ratio") or 1.0  # edge-on disks: the rendered q
    snr = (r["flux"] / 2) / (math.pi * r["radius"] ** 2 * q) / r["sky_sigma"]
    return {"snr": snr, "resolution": r["radius"] / r["psf_fwhm"], "axis_ratio": q}


def clarity(truth: dict) -> float:
    """How clearly volunteers see this galaxy in its picture: the share of them who give the
    true answer to a typical question (each question then has its own offset and scatter).

    :data:`CLEAREST` for a galaxy bright against the noise (``snr`` >= :data:`SNR_CLEAR`), well
    resolved (``resolution`` >= :data:`RES_CLEAR`) and, for a disk, face-on; each shortfall
    lowers it: :data:`FAINT` per dex of ``snr`` below, :data:`SMALL` per dex of ``resolution``
    below (not for artifacts: a star is a point by nature), and for disks :data:`INCLINED` times
    ``1 - axis_ratio`` (an edge-on disk hides its bulge, a tilted spiral its bar and arms).
    Floored at :data:`LEAST_CLEAR`. A pure function of the rendered picture, so of the seed."""
    m = picture_measures(truth)
    c = CLEAREST - FAINT * max(0.0, math.log10(SNR_CLEAR / m["snr"]))
    if truth["type"] != "artifact":
        c -= SMALL * max(0.0, math.log10(RES_CLEAR / m["resolution"]))
    if truth["type"] in ("spiral", "edge-on disk"):
        c -= INCLINED * (1 - m["axis_ratio"])
    return max(LEAST_CLEAR, c)


def _answer_probs(truth: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each question's answer probabilities for this galaxy, also for volunteers off its branch."""
    c = clarity(truth)  # how clear this galaxy's picture is to volunteers

    def cq(delta=0.0):
        return float(np.clip(c + delta + rng.normal(0, 0.03), 0.5, 0.97))

    true = true_answers(truth)
    # Edge-on disks are easy to spot; bars, bulge sizes and arm counts are harder.
    delta = {"disk-edge-on": 0.05, "bar": -0.05, "bulge-size": -0.05, "spiral-winding": -0.15,
             "spiral-arm-count": -0.08}
    if truth["type"] == "spiral" and not truth["arms"]:  # featureless disks look smooth to many
        delta["smooth-or-featured"] = -0.08
    # something-odd has its own model below; the rng draws keep this order (seeded catalogues).
    probs = {q: _p(gz2.QUESTIONS[q], a, cq(delta.get(q, 0.0)), ORDINAL.get(q, {}).get(a))
             for q, a in true.items() if q != "something-odd"}
    odd = rng.uniform(0.55, 0.85) if truth["disturbed"] else rng.uniform(0.02, 0.12)
    probs["something-odd"] = np.array([odd, 1 - odd])
    return probs


def simulate_votes(truth: dict, rng: np.random.Generator) -> dict[str, float | int]:
    """GZ2 vote counts, totals and fractions for every question: ~45 volunteers walk the tree,
    as clearly as the rendered picture lets them (:func:`clarity`; render first)."""
    p = _answer_probs(truth, rng)
    return _walk_tree(rng.integers(38, 53), lambda q, n: rng.multinomial(n, p[q]))


def unanimous_votes(truth: dict, n_volunteers: int = 45) -> dict[str, float | int]:
    """The votes if every volunteer walked the tree giving :func:`true_answers`: what a rule set
    should read from a galaxy whose truth nobody mistakes (``synthetic.truth_morphology``)."""
    true = true_answers(truth)
    return _walk_tree(n_volunteers,
                      lambda q, n: np.array([n if a == true[q] else 0 for a in gz2.QUESTIONS[q]]))


def _walk_tree(n_volunteers: int,
               draw: Callable[[str, int], np.ndarray]) -> dict[str, float | int]:
    """Ask every question in the order volunteers meet it, of those whose answers lead to it;
    ``draw(question, n)`` gives the answer counts of ``n`` volunteers. One catalogue row."""
    asked: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for q in gz2.ASK_ORDER:  # a fixed order: seeded catalogues stay byte-identical
        n = gz2.n_asked(q, n_volunteers, counts)
        asked[q] = int(n)
        counts[q] = dict(zip(gz2.QUESTIONS[q], draw(q, n).tolist()))
    row: dict[str, float | int] = {}
    for q, answers in gz2.QUESTIONS.items():  # columns in catalogue order
        total = asked[q]
        row.update({gz2.count_col(q, a): int(counts[q][a]) for a in answers})
        row[gz2.votes_col(q)] = total
        row.update({gz2.col(q, a): int(counts[q][a]) / total if total else math.nan
                    for a in answers})
    return row
