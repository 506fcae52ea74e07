#!/usr/bin/env bash
# sjax entry point: create/reuse .venv, install sjax (test extras for `test`), then run.
#   ./launch.sh                                  the owl quickstart: `sjax run owl_quickstart`
#   ./launch.sh SUBCOMMAND [CONFIG] [key=value]  run | chat | train | mnist | bench | info | export
#   ./launch.sh test [pytest args]               the test suite
#   ./launch.sh smoke                            one short check of this host (CPU, GPU or TPU)
#   ./launch.sh --procs N SUBCOMMAND ...         N local processes joined on a loopback coordinator
#   ./launch.sh --tpu NAME --zone ZONE [--project P] [--print-only] SUBCOMMAND ...
#                                                copy the checkout to every worker of a TPU pod
#                                                slice and run the same command on all of them
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SJAX_VENV:-.venv}"
PY="${PYTHON:-python3}"

procs=0 tpu="" zone="" project="" print_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --procs) procs="$2"; shift 2 ;;
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --print-only) print_only=1; shift ;;
    *) break ;;
  esac
done
[ $# -eq 0 ] && set -- run owl_quickstart

if [ -n "$tpu" ]; then
  [ -n "$zone" ] || { echo "launch.sh: --tpu needs --zone" >&2; exit 2; }
  flags="--zone=$zone${project:+ --project=$project}"
  args=$(printf '%q ' "$@")
  tarball="/tmp/sjax-src-$tpu.tar.gz"
  cmds=(
    "tar czf $tarball --exclude=./.venv --exclude=./runs --exclude=./.git ."
    "gcloud compute tpus tpu-vm scp $tarball $tpu:~/sjax-src.tar.gz --worker=all $flags"
    "gcloud compute tpus tpu-vm ssh $tpu --worker=all $flags --command='mkdir -p ~/sjax && tar xzf ~/sjax-src.tar.gz -C ~/sjax && cd ~/sjax && ./launch.sh ${args% }'"
  )
  for c in "${cmds[@]}"; do
    echo "$c"
    [ "$print_only" = 1 ] || eval "$c"
  done
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
want="main"
[ "$1" = "test" ] && want="test"
stamp="$VENV/.sjax-installed-$want"
# Reinstall when pyproject.toml changed since the last install of this flavour.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ "$want" = "test" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
  else
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
  fi
  touch "$stamp"
fi
# On a TPU VM or a CUDA host, add the matching jax plugin once (same jax version).
accel=""
if [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then accel="tpu"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then accel="cuda12"; fi
if [ -n "$accel" ] && [ ! -f "$VENV/.sjax-jax-$accel" ]; then
  jv=$("$VENV/bin/python" -c 'import jax; print(jax.__version__)')
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "jax[$accel]==$jv"
  touch "$VENV/.sjax-jax-$accel"
fi

if [ "$1" = "test" ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi

if [ "$procs" -gt 0 ]; then
  port="${SJAX_PORT:-$((20000 + RANDOM % 20000))}"
  pids=()
  for ((i = 0; i < procs; i++)); do
    SJAX_COORDINATOR="127.0.0.1:$port" SJAX_NUM_PROCESSES="$procs" SJAX_PROCESS_ID="$i" \
      "$VENV/bin/python" -m sjax "$@" &
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
exec "$VENV/bin/python" -m sjax "$@"
