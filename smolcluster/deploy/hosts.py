"""How the controller reaches each node: ssh and rsync argument lists, and remote shell snippets.

Nothing here runs anything; `runner.Runner` does. Every value that reaches a remote shell goes
through `quote`, and nothing secret is ever part of an argument list (keys travel on stdin).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from smolcluster.testbed.topology import HostSpec, Topology

# A non-interactive ssh session on macOS has no Homebrew in PATH; tmux and rsync often live there.
EXTRA_PATH = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Host:
    """One node's host: its ssh destination and, for a node behind another, the jump host."""

    node: str
    spec: HostSpec
    via: "Host | None" = None  # the host to jump through (resolved from spec.jump)

    @property
    def destination(self) -> str:
        return f"{self.spec.user}@{self.spec.ssh}" if self.spec.user else self.spec.ssh

    @property
    def is_windows(self) -> bool:
        return self.spec.os == "windows"


def hosts_of(topo: Topology) -> dict[str, Host]:
    """Every node's Host, jumps resolved: `jump: mini1` means through mini1's own host block."""
    out: dict[str, Host] = {}

    def resolve(name: str) -> Host:
        if name not in out:
            spec = topo.nodes[name].host_spec
            via = None
            if spec.jump is not None:
                via = resolve(spec.jump) if spec.jump in topo.nodes else Host(node=spec.jump, spec=HostSpec(ssh=spec.jump))
            out[name] = Host(node=name, spec=spec, via=via)
        return out[name]

    for name in topo.nodes:
        resolve(name)
    return out


def ssh_options(host: Host, ssh_config: str | None) -> list[str]:
    """Options (no command, no destination) for reaching `host`, including how to jump to it."""
    opts = ["-F", ssh_config] if ssh_config else []
    opts += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}", "-o", "ServerAliveInterval=15"]
    if host.spec.port:
        opts += ["-p", str(host.spec.port)]
    if host.via is not None:
        # An explicit ProxyCommand, not -J: command-line options (our -F, ports, users) then apply to
        # the jump host too, which ProxyJump does not promise.
        inner = ["ssh", *ssh_options(host.via, ssh_config), "-W", "%h:%p", host.via.destination]
        opts += ["-o", "ProxyCommand=" + " ".join(shlex.quote(a) for a in inner)]
    return opts


def ssh_argv(host: Host, command: str, ssh_config: str | None, *, tty: bool = False) -> list[str]:
    return ["ssh", *(["-t"] if tty else []), *ssh_options(host, ssh_config), host.destination, command]


def rsync_argv(host: Host, sources: list[str], dest: str, ssh_config: str | None, *, delete: bool = False,
               excludes: tuple[str, ...] = (), protect: tuple[str, ...] = (), copy_links: bool = False) -> list[str]:
    """rsync over the same ssh options. `dest` is a remote path (quoted for the remote shell)."""
    shell = " ".join(_rsync_quote(a) for a in ["ssh", *ssh_options(host, ssh_config)])
    argv = ["rsync", "-a", "--partial", "-e", shell]
    if copy_links:
        argv.append("--copy-links")
    if delete:
        argv.append("--delete")
    argv += [f"--exclude={e}" for e in excludes] + [f"--filter=P {p}" for p in protect]
    return argv + sources + [f"{host.destination}:{dest}"]


def rsync_pull_argv(host: Host, source: str, dest: str, ssh_config: str | None) -> list[str]:
    shell = " ".join(_rsync_quote(a) for a in ["ssh", *ssh_options(host, ssh_config)])
    return ["rsync", "-a", "-e", shell, f"{host.destination}:{source}", dest]


def scp_argv(host: Host, sources: list[str], dest: str, ssh_config: str | None) -> list[str]:
    """scp -r with the same options (scp spells the port -P)."""
    opts = ["-P" if o == "-p" else o for o in ssh_options(host, ssh_config)]
    return ["scp", "-r", "-q", *opts, *sources, f"{host.destination}:{dest}"]


def _rsync_quote(arg: str) -> str:
    """rsync splits -e on spaces and honours single and double quotes (not backslashes)."""
    if arg and not any(c in arg for c in " '\""):
        return arg
    return "'" + arg.replace("'", "") + "'" if "'" in arg else f"'{arg}'"


# --------------------------------------------------------------------------- remote shell snippets (POSIX sh)


def quote_path(path: str) -> str:
    """A remote path for sh: `~/x` becomes "$HOME"/x so the remote user's home is used."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def sh(script: str) -> str:
    """A remote command: PATH extended for Homebrew tools, then `script`, under /bin/sh."""
    return f'PATH="$PATH:{EXTRA_PATH}"; export PATH; {script}'
