"""Shared helpers of the benchmarks: synthetic GZ2 votes and images, devices, memory, FLOPs.

Every benchmark script imports this module from its own folder (``benchmarks/`` is not a package:
the scripts are run as ``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from galaxy_llava import gz2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = Path(os.environ.get("GALAXY_LLAVA_BENCH_CACHE", "/tmp/galaxy-llava-bench"))

# The GZ2 decision tree (galaxy_llava.gz2): question -> (answers, the parent answer whose voters
# are asked it; None for the root, (root, "*") for the question every volunteer reaches).
# A child's total votes are the parent answer's vote count, so an unreached question has 0 votes
# and NaN fractions, as in the real catalogue.
GZ2_TREE: dict[str, tuple[tuple[str, ...], tuple[str, str] | None]] = {
    q: (answers, None if q == gz2.ROOT else (gz2.ROOT, "*") if q == gz2.LAST
        else gz2.reached_by(q)[0])
    for q, answers in gz2.QUESTIONS.items()
}
# Dirichlet base weights per question. Concentration 2 spreads the fractions; the first two
# questions get 0.5 (decisive votes), so many galaxies never reach the disk branch and its
# questions are NaN, as in the real catalogue (there ~76% of rows lack a bar fraction).
_BASE = {
    "smooth-or-featured": (0.66, 0.31, 0.03), "disk-edge-on": (0.3, 0.7),
    "has-spiral-arms": (0.6, 0.4), "bar": (0.3, 0.7), "bulge-size": (0.1, 0.45, 0.35, 0.1),
    "something-odd": (0.3, 0.7), "how-rounded": (0.4, 0.45, 0.15),
    "bulge-shape": (0.5, 0.2, 0.3), "spiral-winding": (0.35, 0.4, 0.25),
    "spiral-arm-count": (0.1, 0.5, 0.15, 0.05, 0.1, 0.1),
}


def synth_votes(n: int, seed: int = 0):
    """A pandas DataFrame of ``n`` rows in the GZ2 vote schema (counts, totals, fractions; NaN
    where no volunteer reached a question) plus ``id_str``/``ra``/``dec``/``summary``/``label``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    counts: dict[str, np.ndarray] = {}
    totals: dict[str, np.ndarray] = {}
    cols: dict[str, np.ndarray] = {}
    top_total = np.clip(rng.normal(44, 9, n).round(), 10, None).astype(np.int64)
    for q, (answers, parent) in GZ2_TREE.items():  # dict order: parents before children
        if parent is None or parent[1] == "*":
            total = top_total
        else:
            total = counts[f"{parent[0]}/{parent[1]}"]
        conc = 0.5 if q in ("smooth-or-featured", "disk-edge-on") else 2.0
        p = rng.dirichlet(np.asarray(_BASE[q]) * conc, size=n)
        c = rng.multinomial(total, p) if n else np.zeros((0, len(answers)), np.int64)
        totals[q] = total
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total[:, None] > 0, c / np.maximum(total, 1)[:, None], np.nan)
        for j, a in enumerate(answers):
            counts[f"{q}/{a}"] = c[:, j]
            cols[f"{q}-gz2_{a}"] = c[:, j]
            cols[f"{q}-gz2_{a}_fraction"] = frac[:, j]
        cols[f"{q}-gz2_total-votes"] = total
    smooth = cols["smooth-or-featured-gz2_smooth_fraction"] > 0.6
    front = {
        "id_str": np.array([f"{587722981741363200 + i}" for i in range(n)]),
        "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-10, 70, n),
        "summary": np.where(smooth, "smooth", "featured"),
        "label": smooth.astype(np.int64),
    }
    return pd.DataFrame({**front, **cols})


def captions(df) -> list[str]:
    """Reference-rule captions (the notebook's ``describe()``) of each row."""
    from galaxy_llava.rules import caption_from_fractions

    return [caption_from_fractions(r, rules="reference") for r in df.to_dict("records")]


def synth_image(rng: np.random.Generator, size: int):
    """A galaxy-like RGB image: an elliptical Gaussian blob on noisy sky (a PIL image)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    theta, q = rng.uniform(0, np.pi), rng.uniform(0.3, 1.0)
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = (-x * np.sin(theta) + y * np.cos(theta)) / q
    blob = np.exp(-(xr**2 + yr**2) / (2 * (size / rng.uniform(6, 14)) ** 2))
    rgb = blob[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0.05, 0.03, (size, size, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def reference_val_indices(n: int) -> set[int]:
    """The items the notebook's ``random_split`` (10% validation, generator seed 42) holds out."""
    import torch

    val = int(0.1 * n)
    if val == 0:
        return set()
    _, held_out = torch.utils.data.random_split(range(n), [n - val, val],
                                                generator=torch.Generator().manual_seed(42))
    return set(held_out.indices)


def make_training_data(folder: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """Write ``n`` synthetic galaxies with real GZ2-grammar captions into ``folder``, in both
    layouts: the notebook's ``gz2_llava.jsonl`` (absolute paths) and a prepared ``dataset.jsonl``
    whose ``val`` split is exactly the 10% the notebook's ``random_split`` holds out (the rest is
    ``train``), so both recipes train on the same galaxies. Cached: an existing folder with the
    same key is reused."""
    folder = Path(folder)
    marker = folder / "done.json"
    key = {"n": n, "image_size": image_size, "seed": seed, "version": 2}
    if marker.exists() and json.loads(marker.read_text()) == key:
        return folder
    from galaxy_llava.rules import morphology_from_fractions

    (folder / "images").mkdir(parents=True, exist_ok=True)
    df = synth_votes(n, seed)
    rng = np.random.default_rng(seed + 1)
    notebook, prepared = [], []
    frac_cols = [c for c in df.columns if c.endswith("_fraction")]
    val = reference_val_indices(n)
    for i, row in enumerate(df.to_dict("records")):
        morph = morphology_from_fractions(row, rules="reference")
        rel = f"images/{row['id_str']}.jpg"
        synth_image(rng, image_size).save(folder / rel, "JPEG", quality=85)
        notebook.append({"image": str((folder / rel).resolve()), "text": morph.caption()})
        prepared.append({
            "image": rel, "text": morph.caption(), "id_str": row["id_str"],
            "split": "validation" if i in val else "train",
            "morphology": morph.to_dict(),
            "fractions": {c: (None if np.isnan(row[c]) else float(row[c])) for c in frac_cols},
        })
    for name, recs in (("gz2_llava.jsonl", notebook), ("dataset.jsonl", prepared)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    marker.write_text(json.dumps(key))
    return folder


# ---------------------------------------------------------------- devices, memory, machine

def pick_device(name: str = "auto") -> str:
    """``auto`` -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA max allocated on a GPU; on CPU the peak resident
    set, sampled every 5 ms from /proc (``ru_maxrss`` is per-process-lifetime, so it cannot tell
    two recipes run in one process apart)."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.startswith("cuda") else "cpu_peak_rss"


def lifetime_max_rss() -> int:
    """The process's lifetime peak RSS in bytes (``resource.getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 125e12, "RTX 4090": 165e12}


def peak_bf16_flops(device: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU in use (H100 SXM and H200: 989e12); None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            # An H100 PCIe card peaks at 756e12, not the SXM figure.
            return 756e12 if key == "H100" and "PCIe" in name else value
    return None


def machine() -> dict:
    """CPU model and cores, torch version, and the GPU's name when one is used."""
    import torch

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # lscpu missing: keep the platform string
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def add_common_args(ap, n: int = 32, batch_size: int = 16) -> None:
    """The flags every inference benchmark shares: preset, images, batch, repeats, device, seed,
    CPU threads and the JSON output."""
    ap.add_argument("--preset", default="tiny", choices=["tiny", "mini", "tinyllava"])
    ap.add_argument("--n", type=int, default=n, help="images per timed pass")
    ap.add_argument("--batch-size", type=int, default=batch_size, help="images per generate call")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1)")
    ap.add_argument("--json", type=Path, default=None)


def image_paths(preset: str, n: int, seed: int = 0) -> tuple[list[str], int]:
    """``n`` synthetic galaxy images at ``preset``'s image size (built once, cached), and that
    size: what the inference benchmarks describe and score."""
    from galaxy_llava.toy.tiny import preset_shapes

    size = preset_shapes(preset)["image_size"]
    data = make_training_data(CACHE / f"data-{preset}-{n}", n, size, seed)
    lines = (data / "gz2_llava.jsonl").read_text().splitlines()
    return [json.loads(line)["image"] for line in lines], size


def machine_line(m: dict) -> str:
    """The ``machine:`` line every benchmark prints first (gpu.sh's summary starts there)."""
    return (f"machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}, "
            f"torch {m['torch']}, {m['date']}")


def write_results(path: Path | None, m: dict, args, summary: dict) -> None:
    """The run's numbers as JSON (machine, arguments, results), when ``--json`` asks."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": m, "args": vars(args) | {"json": str(path)},
                                    **summary}, indent=2, default=str) + "\n")


def set_threads(n: int | None, device: str) -> int:
    """Intra-op threads for CPU runs (default 1): the tiny preset's ops are too small to gain from
    more, and on a 2-core machine shared with other jobs extra threads spin and add noise."""
    import torch

    if str(device).startswith("cpu"):
        torch.set_num_threads(n or 1)
    return torch.get_num_threads()


class GenerateCounter:
    """Wraps ``model.generate`` to count new (non-pad) tokens per returned sequence, for both
    recipes alike; the outputs are returned unchanged."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id, self.tokens, self.sequences = model, pad_id, 0, 0
        self._orig = model.generate

        def generate(*args, **kwargs):
            out = self._orig(*args, **kwargs)
            seqs = out if hasattr(out, "shape") else out.sequences
            prompt_len = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            new = seqs[:, prompt_len:]
            self.tokens += int((new != self.pad_id).sum())
            self.sequences += new.shape[0]
            return out

        model.generate = generate

    def reset(self) -> None:
        self.tokens = self.sequences = 0

    @property
    def mean(self) -> float:
        return self.tokens / max(1, self.sequences)

    def close(self) -> None:
        del self.model.generate  # drops the instance attribute, restoring the class method


class StepProfiler:
    """torch.profiler over a window of training steps, summarised per step as data loading,
    backward, optimizer and forward+rest (the remainder of the wall time), plus the top ops by
    self time. Profiling adds per-op overhead, so the recipe with more ops looks a little slower:
    use it for where the time goes, and the unprofiled runs for rates."""

    def __init__(self, device: str):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if str(device).startswith("cuda"):
            acts.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=acts)
        self.wall = 0.0

    def start(self) -> None:
        self.prof.start()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        self.prof.stop()

    def summary(self, steps: int, top: int = 6) -> dict:
        """Milliseconds per step by phase, and the ``top`` ops by self CPU time."""
        ev = self.prof.key_averages()

        def total(prefix: str) -> float:
            return sum(e.cpu_time_total for e in ev if e.key.startswith(prefix)) / 1e3

        data = total("enumerate(DataLoader)")
        backward = total("autograd::engine::evaluate_function:")
        optim = total("Optimizer.step#") + total("Optimizer.zero_grad#")
        wall = self.wall * 1e3
        per = {"wall": wall, "data": data, "backward": backward, "optimizer": optim,
               "forward_and_rest": max(0.0, wall - data - backward - optim)}
        per = {k: v / max(1, steps) for k, v in per.items()}
        ops = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        per["top_ops"] = [(e.key, e.self_cpu_time_total / 1e3 / max(1, steps)) for e in ops]
        return per


def format_profile(name: str, p: dict) -> str:
    """One line per recipe: ms/step by phase, then its top ops."""
    ops = ", ".join(f"{k} {v:.1f}" for k, v in p["top_ops"])
    return (f"profile {name}: {p['wall']:.1f} ms/step = data {p['data']:.1f} + forward&rest "
            f"{p['forward_and_rest']:.1f} + backward {p['backward']:.1f} + optimizer "
            f"{p['optimizer']:.1f}; top self-CPU ops (ms/step): {ops}")


def median(xs):
    """Median of a non-empty sequence."""
    return statistics.median(xs)


def speedup_line(x: float) -> str:
    """The one closing line every comparison prints."""
    return f"speedup: {x:.2f}x"


def fmt_bytes(n: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / 2**20:.1f} MiB"
