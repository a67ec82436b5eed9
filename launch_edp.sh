#!/usr/bin/env bash
# Start edp on the real cluster described by a topology file (default: topologies/hybrid.yaml):
# preflight every host, sync the code, configs, data and cluster key, start the server and then every
# worker, each in a tmux session on its host.
#   bash launch_edp.sh [FILE] [options]   ==  smolcluster launch FILE --algo edp [options]
# Options pass through, e.g. --dry-run, --preflight, --wait, --status, --stop, --collect, --attach,
# --logging, --ssh-config FILE (see: smolcluster launch --help). The original project's configs/
# layout still works with --config-dir configs (then no FILE).
exec bash "$(dirname "$0")/launch.sh" edp "$@"
