#!/usr/bin/env bash
# Every benchmark for one preset in one run, sized to fit 8 minutes on one H100 for the default
# `tinyllava` preset; `PRESET=tiny bash benchmarks/gpu.sh` runs the same steps on a CPU in minutes,
# `PRESET=mini` (TinyLLaVA's 576 image tokens and 32k vocabulary on 2 narrow layers) on a CPU too.
# Training times galaxy-llava's own trainer (galaxy_llava.training.trainer.train) against the
# notebook's recipe on one model folder per preset, built once and cached under
# ${GALAXY_LLAVA_BENCH_CACHE:-/tmp/galaxy-llava-bench} (tinyllava: 2.8 GB, built on the GPU).
#
# Each step has its own timeout, logs everything to $RESULTS/<step>.log, and a failing step does not
# stop the others. $RESULTS/summary.txt collects the machine, each step's exit code and its
# `speedup:` line; $RESULTS/<step>.json holds the numbers. Exit status: 0 when every step passed.
#
# Settings (environment): PRESET (tinyllava), OUT (/tmp), PYTHON (.venv/bin/python, else python3),
# TRAIN_STEPS, WARMUP, REPEATS, DESCRIBE_N, CATALOGUE_N, ROWS, LOOP_BUDGET, PROFILE=1 (torch.profiler breakdown).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PRESET="${PRESET:-tinyllava}"
RESULTS="${OUT:-/tmp}/galaxy-llava-bench-${PRESET}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [[ "$PRESET" == "tinyllava" ]]; then
  : "${TRAIN_STEPS:=20}" "${WARMUP:=3}" "${REPEATS:=2}" "${DESCRIBE_N:=24}"
  : "${ROWS:=172377}" "${LOOP_BUDGET:=30}" "${CATALOGUE_N:=32}"
  # Training loads the 2.8 GB model folder per run and the full run saves its 5.6 GB fp32 model.
  # prepare-select times CPU work (its numbers come from the CPU table): skipped here for QLoRA.
  T_TRAIN=150; T_DESCRIBE=75; T_CATALOGUE=75; T_QLORA=75; T_PREPARE=0  # worst case 570 s
elif [[ "$PRESET" == "mini" ]]; then
  # A CPU preset: the reference's LoRA step (8 x 616 tokens x 32k logits) takes seconds.
  : "${TRAIN_STEPS:=10}" "${WARMUP:=2}" "${REPEATS:=1}" "${DESCRIBE_N:=16}"
  : "${ROWS:=172377}" "${LOOP_BUDGET:=60}" "${CATALOGUE_N:=8}"
  T_TRAIN=600; T_DESCRIBE=300; T_CATALOGUE=600; T_QLORA=60; T_PREPARE=300
else
  : "${TRAIN_STEPS:=40}" "${WARMUP:=3}" "${REPEATS:=3}" "${DESCRIBE_N:=32}"
  : "${ROWS:=172377}" "${LOOP_BUDGET:=60}" "${CATALOGUE_N:=16}"
  T_TRAIN=300; T_DESCRIBE=300; T_CATALOGUE=300; T_QLORA=60; T_PREPARE=300
fi
PROFILE_FLAG=()
[[ "${PROFILE:-0}" == "1" ]] && PROFILE_FLAG=(--profile)

mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
FAILED=0
{
  echo "galaxy-llava benchmarks, preset $PRESET, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  echo "python: $PYTHON"
  echo "settings: TRAIN_STEPS=$TRAIN_STEPS WARMUP=$WARMUP REPEATS=$REPEATS DESCRIBE_N=$DESCRIBE_N CATALOGUE_N=$CATALOGUE_N ROWS=$ROWS LOOP_BUDGET=$LOOP_BUDGET"
} > "$SUMMARY"

# run_step NAME TIMEOUT_SECONDS COMMAND...: log to NAME.log, record rc and the speedup line.
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$RESULTS/$name.log" rc t0 t1
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$SUMMARY"
  t0=$(date +%s)
  if timeout -k 15 "$limit" "$@" > "$log" 2>&1; then rc=0; else rc=$?; fi
  t1=$(date +%s)
  local line
  line="$(grep -E '^speedup: [0-9]+\.[0-9]{2}x$' "$log" | tail -1 || true)"
  [[ $rc -eq 124 || $rc -eq 137 ]] && line="TIMED OUT after ${limit}s"
  echo "$name: rc=$rc, $((t1 - t0)) s, ${line:-no speedup line}" | tee -a "$SUMMARY"
  # The human-readable result lines (everything from the machine line on) go to the summary too.
  sed -n '/^machine:/,$p' "$log" | grep -v '^speedup:' | sed 's/^/    /' >> "$SUMMARY" || true
  if [[ $rc -ne 0 ]]; then
    FAILED=$((FAILED + 1))
    tail -n 20 "$log" | sed 's/^/    | /' >> "$SUMMARY"
  fi
}

# Cheap: torch only; the other packages are located, not imported (each step imports them).
run_step env 45 "$PYTHON" -c "import importlib.util as u, torch; \
missing = [m for m in ('transformers', 'peft', 'datasets', 'galaxy_llava') if u.find_spec(m) is None]; \
print('machine: torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'missing:', missing or 'none'); \
raise SystemExit(1 if missing else 0)"

for method in full lora; do
  run_step "train-$method" "$T_TRAIN" "$PYTHON" benchmarks/train_throughput.py \
    --preset "$PRESET" --method "$method" --compare --steps "$TRAIN_STEPS" --warmup "$WARMUP" \
    --repeats "$REPEATS" "${PROFILE_FLAG[@]}" --json "$RESULTS/train-$method.json"
done

run_step describe "$T_DESCRIBE" "$PYTHON" benchmarks/describe_throughput.py \
  --preset "$PRESET" --n "$DESCRIBE_N" --compare --repeats "$REPEATS" \
  --json "$RESULTS/describe.json"

# Beam only, flat and tree scoring, and the catalogue in each --caption mode; speedup: tree / flat.
run_step catalogue "$T_CATALOGUE" "$PYTHON" benchmarks/catalogue_throughput.py \
  --preset "$PRESET" --n "$CATALOGUE_N" --repeats 1 \
  --json "$RESULTS/catalogue.json"

# QLoRA (never run on a CPU machine): a short run, loss falls, the adapter reloads; beside LoRA.
# bitsandbytes is CUDA-only and not in the lock: installed from a wheel carried in .whl/.
if ! "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1 && compgen -G ".whl/bitsandbytes-*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-index .whl/bitsandbytes-*.whl || true
fi
run_step qlora "$T_QLORA" "$PYTHON" benchmarks/qlora_check.py \
  --preset "$PRESET" --steps "$TRAIN_STEPS" --json "$RESULTS/qlora.json"

if [[ "$T_PREPARE" -gt 0 ]]; then
  run_step prepare-select "$T_PREPARE" "$PYTHON" benchmarks/prepare_select.py \
    --rows "$ROWS" --loop-budget "$LOOP_BUDGET" --json "$RESULTS/prepare-select.json"
fi

echo "failed steps: $FAILED" | tee -a "$SUMMARY"
echo "results: $RESULTS"
[[ $FAILED -eq 0 ]]
