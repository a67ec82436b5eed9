#!/usr/bin/env bash
# Start EDP training the GPT of configs/gpt_config.yaml on the real cluster, as the original's
# launch_edp_gpt.sh did: WikiText-2 is synced to the hosts with the code.
#   bash launch_edp_gpt.sh [FILE] [options]  ==  smolcluster launch FILE --algo edp --gpt-config configs/gpt_config.yaml [options]
# FILE defaults to topologies/hybrid.yaml; $GPT_CONFIG picks another GPT config. Options pass through.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
file=("$here/topologies/hybrid.yaml")
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then file=("$1"); shift; fi
py="${SMOLCLUSTER_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"
    elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
    else py=python3; fi
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m smolcluster launch "${file[@]}" --algo edp \
    --gpt-config "${GPT_CONFIG:-$here/configs/gpt_config.yaml}" "$@"
