#!/usr/bin/env bash
# sjax entry point: create/reuse .venv, install sjax (test extras for `test`), then run.
#   ./launch.sh                                  the owl quickstart: `sjax run owl:quickstart`
#   ./launch.sh SUBCOMMAND [CONFIG] [key=value]  run | chat | train | mnist | bench | info | export
#   ./launch.sh test [pytest args]               the test suite
#   ./launch.sh smoke                            one short check of this host (CPU, GPU or TPU)
#   ./launch.sh --procs N SUBCOMMAND ...         N local processes joined on a loopback coordinator
#   ./launch.sh --tpu NAME --zone ZONE [--project P] [--print-only] SUBCOMMAND ...
#                                                copy the checkout to every worker of a TPU pod
#                                                slice and run the same command on all of them
#   ./launch.sh --system ...  (or SJAX_SYSTEM=1) use the interpreter and packages already
#                                                installed ($PYTHON, default python3): no venv,
#                                                no pip, no plugin; sjax runs from this checkout
#                                                (PYTHONPATH), after one stderr line naming the
#                                                JAX, backend and devices found. A missing
#                                                required package stops it with one line.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SJAX_VENV:-.venv}"
PY="${PYTHON:-python3}"

procs=0 tpu="" zone="" project="" print_only=0 system="${SJAX_SYSTEM:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --system) system=1; shift ;;
    --procs) procs="$2"; shift 2 ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --print-only) print_only=1; shift ;;
    *) break ;;
  esac
done
[ $# -eq 0 ] && set -- run owl:quickstart

if [ -n "$tpu" ]; then
  [ -n "$zone" ] || { echo "launch.sh: --tpu needs --zone" >&2; exit 2; }
  flags="--zone=$(printf %q "$zone")${project:+ --project=$(printf %q "$project")}"
  pod=$(printf %q "$tpu")
  tarball=$(printf %q "/tmp/sjax-src-$tpu.tar.gz")
  # The remote shell parses `remote`; this shell parses the whole line (eval), so `remote`
  # travels single-quoted with each ' written as '\'' (printf %q alone would not nest).
  remote="mkdir -p ~/sjax && tar xzf ~/sjax-src.tar.gz -C ~/sjax && cd ~/sjax && ./launch.sh$(
    printf ' %q' "$@")"
  sq="'\\''"
  cmds=(
    "tar czf $tarball --exclude=./.venv --exclude=./runs --exclude=./.git ."
    "gcloud compute tpus tpu-vm scp $tarball $pod:~/sjax-src.tar.gz --worker=all $flags"
    "gcloud compute tpus tpu-vm ssh $pod --worker=all $flags --command='${remote//\'/"$sq"}'"
  )
  for c in "${cmds[@]}"; do
    echo "$c"
    [ "$print_only" = 1 ] || eval "$c"
  done
  exit 0
fi

if [ "$system" = 1 ]; then
  py="$PY"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$py" - <<'PYEOF' || exit 2
import importlib.util, sys
need = ("jax", "optax", "orbax", "numpy", "transformers", "tokenizers", "ml_dtypes", "tqdm",
        "filelock", "gguf", "safetensors")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"launch.sh --system: {sys.executable} lacks the required package(s) "
             f"{', '.join(missing)} (this mode installs nothing)")
import jax
devs = jax.devices()
absent = [m for m in ("tensorboardX", "inflect", "torch")
          if importlib.util.find_spec(m) is None]
print(f"launch.sh --system: {sys.executable}: jax {jax.__version__}, "
      f"backend {jax.default_backend()}, {len(devs)} x {devs[0].device_kind}"
      + (f"; not installed: {', '.join(absent)} (tensorboardX: train and run; inflect: run; "
         "torch: the transformers references)" if absent else ""), file=sys.stderr)
PYEOF
else
  py="$VENV/bin/python"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  want="main"
  [ "$1" = "test" ] && want="test"
  stamp="$VENV/.sjax-installed-$want"
  # Reinstall when pyproject.toml changed since the last install of this flavour.
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if [ "$want" = "test" ]; then
      "$py" -m pip install --quiet --disable-pip-version-check -e ".[test]"
    else
      "$py" -m pip install --quiet --disable-pip-version-check -e .
    fi
    touch "$stamp"
  fi
  # On a TPU VM or a CUDA host, add the matching jax plugin once (same jax version).
  accel=""
  if [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then accel="tpu"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then accel="cuda12"; fi
  if [ -n "$accel" ] && [ ! -f "$VENV/.sjax-jax-$accel" ]; then
    jv=$("$py" -c 'import jax; print(jax.__version__)')
    "$py" -m pip install --quiet --disable-pip-version-check "jax[$accel]==$jv"
    touch "$VENV/.sjax-jax-$accel"
  fi
fi

if [ "$1" = "test" ]; then
  shift
  exec "$py" -m pytest "$@"
fi

if [ "$procs" -gt 0 ]; then
  port="${SJAX_PORT:-$((20000 + RANDOM % 20000))}"
  pids=()
  for ((i = 0; i < procs; i++)); do
    SJAX_COORDINATOR="127.0.0.1:$port" SJAX_NUM_PROCESSES="$procs" SJAX_PROCESS_ID="$i" \
      "$py" -m sjax "$@" &
    pids+=($!)
  done
  status=0
  for ((i = 0; i < procs; i++)); do
    if ! wait -n; then  # one failed: stop the others rather than leave them waiting
      status=1
      kill "${pids[@]}" 2>/dev/null || true
    fi
  done
  exit "$status"
fi
exec "$py" -m sjax "$@"
