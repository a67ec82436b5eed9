#!/usr/bin/env bash
# Make the deployment rehearsal's tools available (tests/deploy/: every topology node a network
# namespace with a real sshd; the launcher is rehearsed on them over ssh, rsync and tmux).
# Idempotent: installs from Debian only what is missing, then creates sshd's privilege
# separation directory. Meant for a fresh Debian/Ubuntu machine as root (CI here).
# Exit status 0 = ready; non-zero = not, with the reason on stderr.
set -uo pipefail

say() { echo "deploy-setup: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        say "need root to run: $*"; return 1; fi
}

have() { command -v "$1" >/dev/null 2>&1; }

packages=()
[ -x /usr/sbin/sshd ] || packages+=(openssh-server)
{ have ssh && have ssh-keygen; } || packages+=(openssh-client)
have tmux || packages+=(tmux)
have rsync || packages+=(rsync)
{ have ip && have tc; } || packages+=(iproute2)

if [ "${#packages[@]}" -gt 0 ]; then
    have apt-get || { say "no apt-get: install ${packages[*]} by hand"; exit 1; }
    say "installing ${packages[*]}"
    as_root apt-get update -qq >/dev/null 2>&1 || say "apt-get update failed (continuing)"
    # The package may also start the machine's own sshd; the rehearsal does not use it.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null 2>&1 \
        || { say "could not install ${packages[*]}"; exit 1; }
fi

# sshd refuses to start without its privilege separation directory (tmpfs /run: gone after a reboot).
as_root mkdir -p /run/sshd || { say "could not create /run/sshd"; exit 1; }
say "ready: $(/usr/sbin/sshd -V 2>&1 | head -n1), $(tmux -V), $(rsync --version | head -n1)"
