"""The "init" of one rehearsal host: its own hostname, and a reaper for everything the host starts.

Started by tests/deploy/rehearsal.py inside a node's network namespace as

    ip netns exec NS python hostinit.py HOSTNAME -- /usr/sbin/sshd -f CONFIG ...

Why it exists:
- A real host has its own hostname; namespaces share the machine's UTS name unless we give
  each host its own UTS namespace (so `ssh mini2 hostname` prints mini2).
- A real host has an init that reaps orphans. sshd daemonizes and tmux servers fork away from
  their ssh session, so both end up orphaned. Here PID 1 of the machine does not reap (it is
  not a real init), so every killed sshd or tmux server would stay a zombie. As a child
  subreaper, this process becomes the parent of those orphans and reaps them.

Signals: SIGTERM/SIGINT -> exit 0; SIGUSR1 -> run the command again (sshd restarted after
Rehearsal.stop_sshd). If the first run of the command fails, this exits with its status; the
command's stderr goes to this process's stderr (a log file chosen by the caller).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
CLONE_NEWUTS = 0x04000000  # <linux/sched.h>
WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"hostinit: {what} failed: {os.strerror(err)}")


def _own_hostname(libc: ctypes.CDLL, hostname: str) -> None:
    _check(libc.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    name = hostname.encode()
    _check(libc.sethostname(name, len(name)), f"sethostname({hostname!r})")


def _run(cmd: list[str]) -> int:
    # The child must not inherit our blocked signal mask (sshd needs SIGCHLD and SIGTERM).
    return subprocess.run(cmd, preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)).returncode


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: hostinit.py HOSTNAME -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    hostname, cmd = argv[1], argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    _own_hostname(libc, hostname)
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    # Blocked signals wait for sigwait below: no handler races, nothing lost between checks.
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    rc = _run(cmd)
    if rc != 0:
        print(f"hostinit: {cmd[0]} exited with status {rc}", file=sys.stderr)
        return rc
    while True:
        _reap()
        sig = signal.sigwait(WATCHED)
        if sig in (signal.SIGTERM, signal.SIGINT):
            return 0
        if sig == signal.SIGUSR1 and (rc := _run(cmd)) != 0:
            print(f"hostinit: restarting {cmd[0]} failed with status {rc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
