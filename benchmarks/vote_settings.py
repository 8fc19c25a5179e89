"""Captions or votes: train the demo's full run on each target kind and score it on the
development set of benchmarks/demo_settings.py (600 GalSim galaxies of seed 1, never the demo's
test split), with the grammar scores: exact match of the most probable caption, Zoobot's vote
MSE of type, shape, bar and arms, and type ECE. Needs a finished ``make demo``.

    python benchmarks/vote_settings.py --demo demo-out --work vote-settings   # ~4 min here

Runs: the demo's "full" (30 epochs on one caption per galaxy), "full-votes" (the same on captions
drawn from the votes) and the latter for 50 epochs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RUNS = [("full30", {}), ("votes30", {"caption_targets": "votes"}),
        ("votes50", {"caption_targets": "votes", "num_train_epochs": 50})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo-out"))
    ap.add_argument("--work", type=Path, default=Path("vote-settings"))
    a = ap.parse_args()

    import torch

    from demo_settings import dev_set
    from galaxy_llava.evaluate import evaluate
    from galaxy_llava.training.trainer import train

    torch.set_num_threads(1)
    dev = dev_set(a.work)
    for name, kw in RUNS:
        t = time.time()
        s = {"num_train_epochs": 30, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
             **kw}
        run = a.work / "runs" / name
        train(str(a.demo / "tiny-model"), a.demo / "data", "full", run, seed=0,
              overwrite_output_dir=True, **s)
        g = evaluate(run, dev, split="test", out=a.work / "eval" / name, name=name,
                     overwrite=True)["grammar"]
        print("RESULT", name, f"{time.time() - t:.0f}s", "exact(grammar)",
              round(100 * g["exact_match"], 1),
              {k: round(g["calibration"][k]["vote_mse"], 4) for k in ("type", "shape", "bar",
                                                                      "arms")},
              "typeECE", round(g["calibration"]["type"]["ece"], 3), flush=True)


if __name__ == "__main__":  # dev_set's synthesis starts worker processes
    main()
