#!/usr/bin/env bash
# Start syncps on the real cluster (configs/cluster_config_syncps.yaml): server and workers in tmux over SSH.
# Extra options go to `smolcluster launch`, e.g. --dry-run, --ssh-user, --remote-dir.
set -euo pipefail
cd "$(dirname "$0")"
exec python3 -m smolcluster launch --algo syncps "$@"
