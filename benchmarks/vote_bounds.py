"""What the volunteers' votes themselves score on the demo's test split: the bounds of a model
trained on captions drawn from the votes (``--caption_targets votes``).

A model that learnt the vote distribution exactly would give, per attribute, the probability a
caption drawn from the votes states it. This script computes that predictor from the test
galaxies' own vote fractions (``--draws`` captions per galaxy, drawn as training draws them) and
scores it like any predictor: its type ECE against the thresholded catalogue labels, the exact
match of its most probable caption, and Zoobot's vote MSE. Needs a finished ``make demo``.

    python benchmarks/vote_bounds.py --demo demo-out --draws 2000
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="demo-out")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import numpy as np

    from galaxy_llava.calibration import calibration, format_calibration
    from galaxy_llava.evaluate import dataset_rules, load_split, truth_of
    from galaxy_llava.metrics import format_table, labels_of, score_morphologies
    from galaxy_llava.morphology import ATTRIBUTES
    from galaxy_llava.vote_captions import draw_morphology, record_votes

    data = f"{a.demo}/data"
    rules = dataset_rules(data) or "reference"
    records = load_split(data, "test")
    rng = np.random.default_rng(a.seed)
    probs, modes = [], []
    for r in records:
        drawn = [draw_morphology(record_votes(r), rules, rng) for _ in range(a.draws)]
        labels = [labels_of(m) for m in drawn]
        probs.append({k: {v: c / a.draws for v, c in Counter(x[k] for x in labels).items()}
                      for k in ATTRIBUTES})
        modes.append(Counter(drawn).most_common(1)[0][0])  # the most probable caption
    truths = [truth_of(r) for r in records]
    m = {"name": "the votes", **score_morphologies(truths, modes),
         "calibration": calibration(truths, probs, [r.get("fractions") for r in records], rules)}
    print(format_table([m]))
    print(format_calibration([m]))


if __name__ == "__main__":
    main()
