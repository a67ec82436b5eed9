#!/usr/bin/env bash
# Start EDP training the GPT of configs/gpt_config.yaml on the real cluster, as the original's
# launch_edp_gpt.sh: `smolcluster launch FILE --algo edp --gpt-config configs/gpt_config.yaml`.
#   bash launch_edp_gpt.sh [options]        FILE=topologies/other.yaml bash launch_edp_gpt.sh [options]
# Options pass through to `smolcluster launch` (see: smolcluster launch --help).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${SMOLCLUSTER_PYTHON:-}"
if [ -z "$py" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then py="$VIRTUAL_ENV/bin/python"
    elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
    else py=python3; fi
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m smolcluster launch "${FILE:-$here/topologies/hybrid.yaml}" \
    --algo edp --gpt-config "${GPT_CONFIG:-$here/configs/gpt_config.yaml}" "$@"
