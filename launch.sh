#!/usr/bin/env bash
# sjax entry point: create/reuse .venv, install sjax (and test extras with --test), then run.
#   ./launch.sh [SUBCOMMAND] [CONFIG] [key=value ...]   default: chat with the default model
#   ./launch.sh test [pytest args]                        the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${SJAX_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
want="main"
[ "${1:-}" = "test" ] && want="test"
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

if [ "${1:-}" = "test" ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi
[ $# -eq 0 ] && set -- chat
exec "$VENV/bin/python" -m sjax "$@"
