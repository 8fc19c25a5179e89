"""How the demo's fine-tuning settings were chosen: train the demo's tiny model on the demo's data
with each setting, evaluate on a development set of galaxies from another seed (never the demo's
test split), and probe the frozen features the settings have to work with.

Needs a finished ``make demo`` (its ``tiny-model`` and ``data``). The development set is 600
GalSim galaxies of seed 1, prepared like the demo's (its ``test`` split, 80%, is what is scored).

    python benchmarks/demo_settings.py --demo demo-out --work demo-settings \\
        --run full:12:1e-3 full:30:1e-3 full:50:1e-3 lora:12:3e-3 lora:30:3e-3 --probe

A run is ``METHOD:EPOCHS:LR`` with optional ``:KEY=VALUE`` extras (``lora:30:1e-3:lora_r=64``).
Prints one table row per run (accuracies where each attribute applies, exact match, parse rate,
final training loss) and, with ``--probe``, logistic-regression shape accuracy on the frozen
features: mean-pooled or per token, standardised or not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_run(spec: str) -> tuple[str, str, dict]:
    """``METHOD:EPOCHS:LR[:KEY=VALUE...]`` -> (name, method, train() keywords)."""
    method, epochs, lr, *extra = spec.split(":")
    kw = {"num_train_epochs": int(epochs), "learning_rate": float(lr),
          "per_device_train_batch_size": 16}
    if method == "lora":
        kw |= {"lora_r": 16, "lora_alpha": 32}
    for item in extra:
        key, value = item.split("=", 1)
        kw[key] = _value(value)
    return spec.replace(":", "_").replace("=", "-"), method, kw


def dev_set(work: Path) -> Path:
    """600 galaxies of seed 1, prepared like the demo's data (80% test)."""
    from galaxy_llava.prepare import prepare
    from galaxy_llava.toy.synthetic import synthesize

    synth, dev = work / "synth-seed1", work / "dev"
    if not any(synth.glob("data/*.parquet")):
        synthesize(synth, n=600, seed=1, image_size=128)
    if not (dev / "dataset.jsonl").is_file():
        prepare(synth, dev, n_per_class=600, seed=1, image_size=64, val_fraction=0.1,
                test_fraction=0.8)
    return dev


def probe_features(model: Path, data: Path) -> dict:
    """Shape accuracy of a logistic regression on the frozen features of the ellipticals
    (train -> test of ``data``): mean-pooled or per token, standardised or not."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from galaxy_llava.models.loading import load_for_inference
    from galaxy_llava.models.registry import family_for
    from galaxy_llava.records import load_image, load_records

    net, processor, _ = load_for_inference(str(model))
    family = family_for(net)
    records = [r for r in load_records(data) if r["morphology"]["type"] == "elliptical"]

    def features(split):
        rows = [r for r in records if r["split"] == split]
        out = []
        with torch.no_grad():
            for r in rows:
                x = family.image_inputs(processor, load_image(r["image"]))
                f = family.split_features(family.vision_features(net, x), x)[0].float()
                out.append(f.reshape(-1, f.shape[-1]).numpy())
        return np.stack(out), [r["morphology"]["shape"] for r in rows]

    (xtr, ytr), (xte, yte) = features("train"), features("test")
    found = {"n_train": len(ytr), "n_test": len(yte),
             "feature_std_across_images": float(xtr.std(0).mean()),
             "feature_mean_abs": float(np.abs(xtr).mean())}
    for pooling, a, b in (("mean", xtr.mean(1), xte.mean(1)),
                          ("per_token", xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1))):
        for scaled in (True, False):
            clf = LogisticRegression(max_iter=3000)
            clf = make_pipeline(StandardScaler(), clf) if scaled else clf
            found[f"{pooling}_{'standardised' if scaled else 'raw'}"] = float(
                clf.fit(a, ytr).score(b, yte))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo-out"), help="a finished demo's folder")
    ap.add_argument("--work", type=Path, required=True, help="runs, evaluations, the dev set")
    ap.add_argument("--run", nargs="*", default=[], help="METHOD:EPOCHS:LR[:KEY=VALUE...]")
    ap.add_argument("--probe", action="store_true", help="probe the frozen features")
    args = ap.parse_args(argv)

    import torch

    from galaxy_llava.evaluate import evaluate
    from galaxy_llava.training.trainer import train

    torch.set_num_threads(1)
    model, data = args.demo / "tiny-model", args.demo / "data"
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} not found: run `make demo` first")
    dev = dev_set(args.work)
    results = {}
    for spec in args.run:
        name, method, kw = parse_run(spec)
        run = args.work / "runs" / name
        metrics = train(str(model), data, method, run, seed=0, overwrite_output_dir=True, **kw)
        m = evaluate(run, dev, split="test", out=args.work / "eval" / name, name=name,
                     overwrite=True, scores=False)
        acc = {a: m["attributes"][a]["accuracy"] for a in ("type", "shape", "bar", "arms")}
        results[name] = {**acc, "exact": m["exact_match"], "parse": m["parse_rate"],
                         "final_train_loss": metrics["final_train_loss"], "settings": kw}
    if results:
        print(f"\n{'run':34s} {'type':>6s} {'shape':>6s} {'bar':>6s} {'arms':>6s} {'exact':>6s} "
              f"{'parse':>6s} {'loss':>6s}")
        for name, r in results.items():
            print(f"{name:34s} " + " ".join(f"{100 * r[k]:5.1f}%" for k in
                                            ("type", "shape", "bar", "arms", "exact", "parse"))
                  + f" {r['final_train_loss']:6.3f}")
    if args.probe:
        found = probe_features(model, data)
        results["probe"] = found
        print("\nshape probe on the frozen features (demo train -> demo test ellipticals):")
        print(json.dumps(found, indent=2))
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
