#!/usr/bin/env bash
# Start syncps on the real cluster described by a topology file (default: topologies/hybrid.yaml next to
# this script): preflight every host, sync the code, configs, data and cluster key, start the server and
# then every worker, each in a tmux session on its host.
#   bash launch_syncps.sh [FILE] [options]   ==  smolcluster launch FILE --algo syncps [options]
# Options pass through, e.g. --dry-run, --preflight, --wait, --status, --stop, --collect, --attach,
# --ssh-config FILE (see: smolcluster launch --help). The original project's configs/ layout still
# works with --config-dir configs (then no FILE).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
file=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    file=("$1"); shift
elif [[ " $* " != *" --config-dir "* ]]; then
    file=("$here/topologies/hybrid.yaml")
fi
# This checkout's code, run by: $SMOLCLUSTER_PYTHON, else the active virtualenv's Python, else the
# checkout's own .venv (uv sync), else python3.
py="${SMOLCLUSTER_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"
    elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
    else py=python3; fi
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m smolcluster launch "${file[@]}" --algo syncps "$@"
