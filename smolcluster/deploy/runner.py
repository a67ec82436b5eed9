"""Runs the commands the deploy verbs build, or, with --dry-run, prints them and runs none.

Data that must not appear in any process listing (the cluster key) is passed as `stdin`, never
in an argument; the dry run prints "<stdin: N bytes>" in its place.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Callable

from smolcluster.deploy.hosts import Host, rsync_argv, rsync_pull_argv, sh, ssh_argv


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def reason(self) -> str:
        """The last meaningful line of stderr (or stdout), for one-line error messages."""
        for text in (self.err, self.out):
            lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return f"exit code {self.code}"


DRY_RUN_RESULT = Result(0, "", "")


class Runner:
    def __init__(self, *, ssh_config: str | None = None, dry_run: bool = False,
                 echo: Callable[[str], None] = print):
        self.ssh_config = ssh_config
        self.dry_run = dry_run
        self.echo = echo

    def run(self, argv: list[str], *, stdin: bytes | None = None, timeout: float = 120.0) -> Result:
        if self.dry_run:
            self.echo(" ".join(shlex.quote(a) for a in argv) + (f"   <stdin: {len(stdin)} bytes>" if stdin else ""))
            return DRY_RUN_RESULT
        try:
            p = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout:.0f}s: {argv[0]}")
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]} is not installed on this machine")
        return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))

    def ssh(self, host: Host, script: str, *, stdin: bytes | None = None, timeout: float = 120.0) -> Result:
        """Run a POSIX sh snippet on `host` (PATH extended for Homebrew tools)."""
        return self.run(ssh_argv(host, sh(script), self.ssh_config), stdin=stdin, timeout=timeout)

    def ssh_raw(self, host: Host, command: str, *, stdin: bytes | None = None, timeout: float = 120.0) -> Result:
        """Run `command` as the remote shell gets it (Windows: cmd.exe)."""
        return self.run(ssh_argv(host, command, self.ssh_config), stdin=stdin, timeout=timeout)

    def rsync(self, host: Host, sources: list[str], dest: str, *, timeout: float = 600.0, **kw) -> Result:
        return self.run(rsync_argv(host, sources, dest, self.ssh_config, **kw), timeout=timeout)

    def rsync_pull(self, host: Host, source: str, dest: str, *, timeout: float = 600.0) -> Result:
        return self.run(rsync_pull_argv(host, source, dest, self.ssh_config), timeout=timeout)
