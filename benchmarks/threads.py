"""CPU threads: the same `galaxy-llava` commands timed at several torch thread counts, side by side.

Why: on a shared machine, torch's default (one thread per core) can make small models many times
slower than one thread. This script measures that choice, so the CLI's default
(``galaxy_llava.config.DEFAULT_THREADS``) rests on numbers (BENCHMARKS.md, "CPU threads").

Each workload is a real command in a fresh process, as a user runs it (start-up, imports and model
loading included), once per thread setting per repeat; the order of the settings alternates from
repeat to repeat, so load from other jobs falls on both sides. A setting is ``--threads N`` of
the CLI (``0``: torch's own choice, one thread per core); ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are removed from the children's environment. Reported per setting: the
median wall time, each repeat's, the children's CPU time (user + system) and the load average
when the runs started.

Workloads (``--workloads``):
  pretrain     tiny-model --pretrain-steps STEPS (tiny preset)
  train        train --method lora --max_steps TRAIN_STEPS, batch 8, on the tiny preset
  train-mini   the same on the mini preset (336 px, 576 image tokens, 32,064-token vocabulary)
Data for the train workloads (a synthetic catalogue, a prepared dataset, the models) is made once,
untimed, under ``--work``.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/threads.py --threads 1,2,0 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = ("pretrain", "train", "train-mini")


def cli(*args: str) -> list[str]:
    """The command line of ``galaxy-llava ARGS`` run by this Python."""
    return [sys.executable, "-m", "galaxy_llava", *args]


def child_env() -> dict[str, str]:
    """The environment of every timed command: no thread variables (the flag decides), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command to its end (raise with its output on failure); (wall s, its CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env or child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare_inputs(work: Path, workloads: list[str]) -> dict[str, Path]:
    """Make once (untimed, one thread) what the train workloads read: data and models."""
    env = {**child_env(), "OMP_NUM_THREADS": "1"}
    paths = {"data": work / "data", "tiny": work / "tiny", "mini": work / "mini"}
    if not {"train", "train-mini"} & set(workloads):
        return paths
    if not paths["data"].exists():
        run(cli("synth", "--out", str(work / "synth"), "--n", "60", "--seed", "0",
                "--image-size", "128"), env)
        run(cli("prepare", "--source", str(work / "synth"), "--out", str(paths["data"]),
                "--n-per-class", "20", "--image-size", "64", "--workers", "1"), env)
    for preset, workload in (("tiny", "train"), ("mini", "train-mini")):
        if workload in workloads and not paths[preset].exists():
            run(cli("tiny-model", "--out", str(paths[preset]), "--preset", preset), env)
    return paths


def command(workload: str, threads: int, work: Path, paths: dict[str, Path],
            args: argparse.Namespace) -> list[str]:
    """The timed command of a workload at a thread setting."""
    out = str(work / f"out-{workload}-{threads}")
    if workload == "pretrain":
        return cli("--threads", str(threads), "tiny-model", "--out", out, "--pretrain-steps",
                   str(args.steps), "--overwrite")
    model = paths["mini" if workload == "train-mini" else "tiny"]
    return cli("--threads", str(threads), "train", "--model", str(model), "--data",
               str(paths["data"]), "--method", "lora", "--max_steps", str(args.train_steps),
               "--per_device_train_batch_size", "8", "--output_dir", out,
               "--overwrite_output_dir", "--save_strategy", "no", "--eval_strategy", "no",
               "--report_to", "none", "--logging_steps", "1000")


def torch_default_threads() -> int:
    """How many threads torch takes by itself here (no thread variables set)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env=child_env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def main(argv: list[str] | None = None) -> dict:
    """Time every workload at every thread setting; print a table per workload; return it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2,0",
                   help="comma-separated --threads values (0: torch's own choice)")
    p.add_argument("--workloads", default="pretrain,train",
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, default=40, help="pretraining steps (pretrain)")
    p.add_argument("--train-steps", type=int, default=20, help="optimizer steps (train*)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    settings = [int(t) for t in args.threads.split(",")]
    workloads = args.workloads.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload {unknown[0]!r}; expected {', '.join(WORKLOADS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="galaxy-llava-threads-"))
    paths = prepare_inputs(work, workloads)
    default = torch_default_threads()
    print(f"cores: {os.cpu_count()}; torch's own choice (--threads 0): {default} threads")
    results: dict = {"cores": os.cpu_count(), "torch_default_threads": default, "workloads": {}}
    for workload in workloads:
        runs: dict[int, list[dict]] = {t: [] for t in settings}
        for r in range(args.repeats):
            for t in (settings if r % 2 == 0 else settings[::-1]):
                load = os.getloadavg()[0]
                wall, cpu = run(command(workload, t, work, paths, args))
                runs[t].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                "load_1min": round(load, 2)})
                print(f"  {workload} --threads {t}: {wall:.1f} s wall, {cpu:.1f} s CPU "
                      f"(load {load:.2f})", flush=True)
        best = min(statistics.median(x["wall_s"] for x in v) for v in runs.values())
        print(f"\n{workload}: median wall seconds over {args.repeats} repeats")
        print("| --threads | threads used | median wall s | each repeat | CPU s | x the best |")
        print("|---|---|---|---|---|---|")
        for t, v in runs.items():
            med = statistics.median(x["wall_s"] for x in v)
            print(f"| {t} | {t or default} | {med:.1f} | "
                  f"{', '.join(str(x['wall_s']) for x in v)} | "
                  f"{', '.join(str(x['cpu_s']) for x in v)} | {med / best:.2f} |")
        print()
        results["workloads"][workload] = {str(t): v for t, v in runs.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
