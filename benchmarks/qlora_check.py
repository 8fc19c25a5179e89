"""QLoRA on a GPU: one short ``galaxy-llava train --method qlora`` run of the preset's model.

Checks what has never run on a CPU machine: the 4-bit NF4 base (bitsandbytes) trains, its loss
falls (the mean of the last three logged losses below the first three), and the adapter it saves
reloads and describes images (``describe_paths``: the base loaded unquantised, the adapter on
top). Records the step time, samples/s and CUDA peak memory beside the same run with
``--method lora`` (same steps, batch, rank), so the 4-bit base's memory saving and its cost in
speed are measured side by side.

Without CUDA or without bitsandbytes it says so in one line and exits 0 (``gpu.sh`` runs it on
every preset; only a GPU run measures anything). bitsandbytes is not in the lock (CUDA only): on
a machine without a registry, ``gpu.sh`` installs it from a wheel in ``.whl/`` when one is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def _losses(run: Path) -> list[float]:
    lines = (run / "loss_log.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["split"] == "train"]


def run_method(method: str, model_dir: Path, data: Path, steps: int, batch: int,
               workdir: Path) -> dict:
    """One short training run: wall time, samples/s, CUDA peak memory and its losses."""
    import torch

    from galaxy_llava.training.trainer import train

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = train(str(model_dir), data, method, workdir / method, max_steps=steps,
                    per_device_train_batch_size=batch, learning_rate=2e-4, lora_r=16,
                    lora_alpha=16, logging_steps=1, save_strategy="no", eval_strategy="no",
                    report_to="none")
    torch.cuda.synchronize()
    losses = _losses(workdir / method)
    return {"method": method, "wall_s": time.perf_counter() - t0,
            "train_s": metrics["train_seconds"],
            "samples_per_s": metrics["samples_per_second"],
            "s_per_step": (metrics["train_seconds"] or 0) / steps,
            "peak_bytes": torch.cuda.max_memory_allocated(), "losses": losses,
            "loss_falls": sum(losses[-3:]) / 3 < sum(losses[:3]) / 3}


def main() -> int:
    from galaxy_llava.toy.tiny import PRESETS, preset_shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tinyllava", choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    m = bc.machine()
    print(bc.machine_line(m))
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        why = "no CUDA" if not torch.cuda.is_available() else "bitsandbytes not installed"
        print(f"qlora: skipped ({why}; QLoRA's 4-bit kernels need both)")
        bc.write_results(args.json, m, args, {"skipped": why})
        return 0
    import train_throughput as tt
    from galaxy_llava.generate import describe_paths

    size = preset_shapes(args.preset)["image_size"]
    n = max(64, args.steps * args.batch_size)
    data = bc.make_training_data(bc.CACHE / f"data-{args.preset}-{n}", n, size, args.seed)
    model_dir = tt.model_folder(args.preset, args.seed, "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_method(method, model_dir, data, args.steps, args.batch_size, Path(tmp))
                   for method in ("qlora", "lora")]
        images, _ = bc.image_paths(args.preset, 2, args.seed)
        captions = [r["caption"] for r in describe_paths(Path(tmp) / "qlora", images,
                                                         max_new_tokens=12)]
    q, lora = results
    for r in results:
        print(f"{r['method']}: {r['s_per_step'] * 1000:.0f} ms/step, "
              f"{r['samples_per_s'] or 0:.1f} samples/s, peak {bc.fmt_bytes(r['peak_bytes'])}, "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} "
              f"({'falls' if r['loss_falls'] else 'DOES NOT FALL'})")
    print(f"qlora adapter reloaded; captions: {captions}")
    print(f"qlora/lora peak memory {q['peak_bytes'] / lora['peak_bytes']:.2f}x, "
          f"step time {q['s_per_step'] / lora['s_per_step']:.2f}x")
    bc.write_results(args.json, m, args, {"results": results, "captions": captions})
    return 0 if q["loss_falls"] and all(captions) else 1


if __name__ == "__main__":
    raise SystemExit(main())
