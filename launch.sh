#!/usr/bin/env bash
# The real-cluster launcher behind launch_edp.sh, launch_syncps.sh and launch_edp_gpt.sh:
#   bash launch.sh ALGO [FILE] [options]  ==  smolcluster launch FILE --algo ALGO [options]
# FILE defaults to topologies/hybrid.yaml next to this script (none with --config-dir, the original
# project's configs/ layout). It runs this checkout's code with $SMOLCLUSTER_PYTHON, else the active
# virtualenv's Python, else the checkout's own .venv (uv sync), else python3.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
algo="$1"; shift
file=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    file=("$1"); shift
elif [[ " $* " != *" --config-dir "* ]]; then
    file=("$here/topologies/hybrid.yaml")
fi
py="${SMOLCLUSTER_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"
    elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
    else py=python3; fi
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m smolcluster launch "${file[@]}" --algo "$algo" "$@"
