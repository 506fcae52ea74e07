#!/usr/bin/env bash
# The GPU check, one prepared run (<= 8 minutes on one H200): devices, forward parity and
# greedy decode against transformers, bench train (Qwen2.5-0.5B LoRA/full bf16, Qwen2.5-7B
# LoRA bf16), bench sample (0.5B, batch 64/256, bf16) and the smoke pipeline, all on
# random-weight models. Prints as it goes and writes OUT_DIR/gpu_check.json (plus each
# section's own JSON under OUT_DIR/sections and the benches' under OUT_DIR/bench_*).
#   benchmarks/gpu_check.sh OUT_DIR                 full size (an accelerator)
#   benchmarks/gpu_check.sh --tiny OUT_DIR          every section at toy sizes (any CPU)
#   benchmarks/gpu_check.sh --only parity,greedy OUT_DIR   a rerun of some sections
# Runs in system mode (launch.sh --system): $PYTHON (default python3) with the packages
# already installed; nothing is installed. Pure-Python packages the machine lacks travel as
# wheels in $SJAX_WHEELS (default runs/wheels), imported from the zip files as they are.
# The H200 image lacks the pipeline's tensorboardX and inflect; fetch them here with
#   .venv/bin/pip download --no-deps -d runs/wheels tensorboardX==2.6.5 inflect==7.6.0 \
#       typeguard==4.6.1 more-itertools==11.2.1
# and carry runs/wheels (an ignored folder) with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: benchmarks/gpu_check.sh [--tiny] [--only S1,S2] OUT_DIR" >&2; exit 2; }
export SJAX_SYSTEM=1
# JAX would take 75% of the GPU at start-up; the sections run in several processes
export XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for wheel in "${SJAX_WHEELS:-runs/wheels}"/*.whl; do
  [ -f "$wheel" ] && PYTHONPATH="$PYTHONPATH:$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
done
# launch.sh's system check: one line naming the JAX, backend and devices, or the missing package
./launch.sh --system info model.init=random model.name=smollm2-135m >/dev/null
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
