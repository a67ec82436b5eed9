#!/usr/bin/env bash
# Start EDP training the GPT of configs/gpt_config.yaml on the real cluster, as the original's
# launch_edp_gpt.sh did: WikiText-2 is synced to the hosts with the code.
#   bash launch_edp_gpt.sh [FILE] [options]  ==  smolcluster launch FILE --algo edp --gpt-config configs/gpt_config.yaml [options]
# FILE defaults to topologies/hybrid.yaml; $GPT_CONFIG picks another GPT config. Options pass through.
here="$(cd "$(dirname "$0")" && pwd)"
exec bash "$here/launch.sh" edp "$@" --gpt-config "${GPT_CONFIG:-$here/configs/gpt_config.yaml}"
