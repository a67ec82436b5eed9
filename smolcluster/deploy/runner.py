"""Runs the commands the deploy verbs build, or, with --dry-run, prints them and runs none.

Data that must not appear in any process listing (the cluster key) is passed as `stdin`, never
in an argument; the dry run prints "<stdin: N bytes>" in its place.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from smolcluster.deploy.hosts import Host, rsync_argv, rsync_pull_argv, scp_argv, sh, ssh_argv


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
T = TypeVar("T")
R = TypeVar("R")


class Runner:
    def __init__(self, *, ssh_config: str | None = None, dry_run: bool = False,
                 echo: Callable[[str], None] = print):
        self.ssh_config = ssh_config
        self.dry_run = dry_run
        self._echo = echo
        self._lock = threading.Lock()

    def echo(self, line: str) -> None:
        """Print one line; lines from parallel hosts never interleave."""
        with self._lock:
            self._echo(line)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """fn over items, one thread per item (hosts work in parallel); in order, one at a time, for a dry run."""
        items = list(items)
        if self.dry_run or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            return list(pool.map(fn, items))

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

    def scp(self, host: Host, sources: list[str], dest: str, *, timeout: float = 600.0) -> Result:
        return self.run(scp_argv(host, sources, dest, self.ssh_config), timeout=timeout)
