#!/usr/bin/env bash
# Make a Docker engine + compose available for the compose-backend tests (tests/topology/).
# Idempotent: installs only what is missing, starts dockerd only when no engine answers,
# then waits until `docker info` works. Meant for a fresh Debian/Ubuntu machine as root
# (CI here); on a developer machine with Docker Desktop it just finds the running engine.
#
# Fallbacks, tried in order when dockerd does not come up:
#   1. iptables-nft fails on kernels without nf_tables  -> switch to iptables-legacy
#   2. overlay2 fails when this machine is itself a container -> --storage-driver=vfs
#   3. no usable iptables at all -> --iptables=false (smolcluster's containers drop their
#      default route and only use the topology's routes, so isolation does not rely on it)
# Exit status 0 = engine ready; non-zero = it is not, with the reason on stderr.
set -uo pipefail

LOG="${SMOLCLUSTER_DOCKERD_LOG:-/tmp/dockerd.log}"
WAIT_SECONDS="${SMOLCLUSTER_DOCKERD_WAIT:-60}"

say() { echo "docker-setup: $*" >&2; }

engine_ready() { docker info >/dev/null 2>&1; }

have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root to run: $*"; return 1; fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get: install $* by hand"; return 1; }
    if [ -z "${_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed (continuing)"
        _APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

# ---------------------------------------------------------------- install what is missing
packages=()
command -v docker >/dev/null 2>&1 || packages+=(docker.io)
if ! engine_ready && ! command -v dockerd >/dev/null 2>&1; then packages+=(docker.io); fi
have_compose || packages+=(docker-compose)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || packages+=(iproute2)
# iptables' statistic match drops a link profile's loss_pct where the kernel has no netem; the offline
# image runs the host's /usr, so the host needs it (docker.io usually pulls it in).
{ command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ]; } || packages+=(iptables)
if [ "${#packages[@]}" -gt 0 ]; then
    # de-duplicate (docker.io may be listed twice)
    mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
    say "installing ${packages[*]}"
    apt_install "${packages[@]}" || { say "could not install ${packages[*]}"; exit 1; }
fi

# ---------------------------------------------------------------- start the engine
wait_ready() {
    local i
    for ((i = 0; i < WAIT_SECONDS; i++)); do
        engine_ready && return 0
        # dockerd died: no point waiting for it
        if [ -n "${DOCKERD_PID:-}" ] && ! kill -0 "$DOCKERD_PID" 2>/dev/null; then return 1; fi
        sleep 1
    done
    return 1
}

start_dockerd() {  # extra dockerd flags as arguments
    as_root rm -f /var/run/docker.pid
    say "starting dockerd $* (log: $LOG)"
    if [ "$(id -u)" -eq 0 ]; then
        nohup dockerd "$@" >>"$LOG" 2>&1 &
    else
        sudo -n nohup dockerd "$@" >>"$LOG" 2>&1 &
    fi
    DOCKERD_PID=$!
    wait_ready
}

stop_our_dockerd() {
    [ -n "${DOCKERD_PID:-}" ] || return 0
    as_root kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    DOCKERD_PID=""
}

if engine_ready; then
    say "engine already running"
else
    # A dockerd that is running but not answering yet (e.g. started a moment ago): give it time.
    if pgrep -x dockerd >/dev/null 2>&1 && wait_ready; then
        say "engine came up"
    elif [ -d /run/systemd/system ] && as_root systemctl start docker >/dev/null 2>&1 && wait_ready; then
        say "engine started by systemd"
    else
        started=0
        start_dockerd && started=1
        if [ "$started" -eq 0 ] && grep -qiE 'iptables|nf_tables|nftables' "$LOG" 2>/dev/null \
            && command -v update-alternatives >/dev/null 2>&1 && [ -x /usr/sbin/iptables-legacy ]; then
            stop_our_dockerd
            say "iptables (nft) failed; switching to iptables-legacy"
            as_root update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null 2>&1
            as_root update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null 2>&1
            start_dockerd && started=1
        fi
        if [ "$started" -eq 0 ] && grep -qiE 'overlay' "$LOG" 2>/dev/null; then
            stop_our_dockerd
            say "overlay2 storage failed; using the vfs storage driver"
            start_dockerd --storage-driver=vfs && started=1
        fi
        if [ "$started" -eq 0 ]; then
            stop_our_dockerd
            say "retrying without iptables management"
            start_dockerd --iptables=false --storage-driver=vfs && started=1
        fi
        if [ "$started" -eq 0 ]; then
            stop_our_dockerd
            say "dockerd did not become ready within ${WAIT_SECONDS}s; last log lines:"
            tail -n 20 "$LOG" >&2 2>/dev/null
            exit 1
        fi
    fi
fi

have_compose || { say "no 'docker compose' (v2) and no 'docker-compose' (v1)"; exit 1; }
say "ready: $(docker version --format 'engine {{.Server.Version}}' 2>/dev/null)," \
    "compose: $(docker compose version --short 2>/dev/null || docker-compose version --short 2>/dev/null)"
