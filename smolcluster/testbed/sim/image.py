"""Container images for the compose backend.

Two kinds:
- the **user image**, built from compose/Dockerfile (official python:3.11-slim base, installs
  torch CPU and the project). Needs a registry to pull the base image and wheels.
- the **offline image**, for hosts without a registry (CI here): `docker import` of an almost
  empty root — bin, lib, lib64 and sbin as links into usr/, plus /etc basics — built with no
  pull at all. Containers then run it with the host's /usr, the Python environment and this
  repo bind-mounted read-only, so they run exactly the Python (and torch, and iproute2's
  `ip`/`tc`) the host has. Only works where containers share the host's kernel and CPU
  architecture, which is the case for a local Linux engine.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from smolcluster.common.errors import DockerCommandFailed, DockerUnavailable
from smolcluster.testbed.sim.docker_env import DockerEnv

OFFLINE_REPO = "smolcluster-offline"
USER_IMAGE = "smolcluster:latest"
# Paths in the image that are links into the bind-mounted /usr (merged-/usr layout, as on
# Debian 12 / Ubuntu 22.04+). /lib64 holds the dynamic loader on x86_64.
USR_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
EMPTY_DIRS = ("usr", "etc", "tmp", "var/tmp", "root", "proc", "sys", "dev", "run", "home", "mnt", "opt")
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}
# Copied from the host so the dynamic loader finds libraries exactly as on the host.
HOST_ETC_COPIES = ("etc/ld.so.cache", "etc/ld.so.conf")


@dataclass(frozen=True)
class BindMount:
    source: str
    target: str
    read_only: bool = True

    def compose(self) -> str:
        return f"{self.source}:{self.target}{':ro' if self.read_only else ''}"


def repo_root() -> Path:
    """The checkout this smolcluster runs from (holds smolcluster/, netem/, topologies/)."""
    import smolcluster

    return Path(smolcluster.__file__).resolve().parent.parent


def _offline_root_files() -> list[tuple[str, bytes | None, str | None]]:
    """(path, file content or None, symlink target or None) — the whole image, in order."""
    entries: list[tuple[str, bytes | None, str | None]] = [(d, None, None) for d in EMPTY_DIRS]
    entries += [(name, None, target) for name, target in USR_LINKS.items()]
    entries += [(path, text.encode(), None) for path, text in ETC_FILES.items()]
    for rel in HOST_ETC_COPIES:
        host = Path("/") / rel
        if host.is_file():
            entries.append((rel, host.read_bytes(), None))
    # Debian's alternatives (awk -> mawk, ...) are links through /etc; keep them working.
    alternatives = Path("/etc/alternatives")
    if alternatives.is_dir():
        entries.append(("etc/alternatives", None, None))
        for f in sorted(alternatives.iterdir()):
            if f.is_symlink() and os.readlink(f).startswith("/usr/"):
                entries.append((f"etc/alternatives/{f.name}", None, os.readlink(f)))
    if Path("/etc/ld.so.conf.d").is_dir():
        entries.append(("etc/ld.so.conf.d", None, None))
        for f in sorted(Path("/etc/ld.so.conf.d").glob("*.conf")):
            entries.append((f"etc/ld.so.conf.d/{f.name}", f.read_bytes(), None))
    return entries


def offline_root_tar() -> bytes:
    """The root filesystem as a tar, byte-for-byte reproducible (fixed mtimes and owners)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content, link in _offline_root_files():
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if link is not None:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
                tar.addfile(info)
            elif content is None:
                info.type, info.mode = tarfile.DIRTYPE, (0o1777 if path in ("tmp", "var/tmp") else 0o755)
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def offline_image_tag(tar_bytes: bytes | None = None) -> str:
    """smolcluster-offline:<hash of the root>; a changed root (new ld.so.cache) gets a new tag."""
    digest = hashlib.sha256(tar_bytes if tar_bytes is not None else offline_root_tar()).hexdigest()[:12]
    return f"{OFFLINE_REPO}:{digest}"


def image_exists(env: DockerEnv, tag: str) -> bool:
    return env.run(["image", "inspect", tag], check=False, timeout=30).returncode == 0


def check_offline_host() -> None:
    """The offline image borrows the host's /usr: it needs a Linux host with a merged /usr."""
    if sys.platform != "linux":
        raise DockerUnavailable("the offline image runs the host's own /usr and Python inside containers, which only "
                                "works with a Linux host; build the user image instead: `smolcluster image build`")
    for name in ("bin", "lib"):
        p = Path("/") / name
        if not (p.is_symlink() and os.readlink(p).lstrip("/") == f"usr/{name}"):
            raise DockerUnavailable(f"/{name} is not a link into /usr on this host (no merged /usr), so the offline "
                                    "image cannot borrow /usr; build the user image instead: `smolcluster image build`")


def build_offline_image(env: DockerEnv, force: bool = False) -> str:
    """`docker import` the minimal root (no pull, no network) and return its tag. Cached by content hash."""
    check_offline_host()
    tar_bytes = offline_root_tar()
    tag = offline_image_tag(tar_bytes)
    if not force and image_exists(env, tag):
        return tag
    _docker_with_input(env, ["import", "--message", "smolcluster offline root (host /usr bind-mounted)", "-", tag], tar_bytes)
    return tag


def _docker_with_input(env: DockerEnv, args: list[str], data: bytes) -> None:
    """`docker ARGS` fed `data` on stdin (bytes: DockerEnv.run speaks text); DockerCommandFailed unless it succeeds."""
    try:
        proc = subprocess.run([env.docker, *args], input=data, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise DockerCommandFailed(f"`docker {' '.join(args)}` did not finish within 120s") from None
    if proc.returncode != 0:
        raise DockerCommandFailed(f"`docker {' '.join(args)}` failed: {proc.stderr.decode(errors='replace')[-2000:]}")


def build_user_image(env: DockerEnv, tag: str = USER_IMAGE, timeout: float = 3600.0) -> str:
    """`docker build -f compose/Dockerfile -t TAG <repo>` — needs a registry for the python base image."""
    root = repo_root()
    dockerfile = root / "compose" / "Dockerfile"
    if not dockerfile.is_file():
        raise DockerUnavailable(f"{dockerfile} not found; the user image is built from a smolcluster checkout")
    env.run(["build", "-f", str(dockerfile), "-t", tag, str(root)], timeout=timeout)
    return tag


def offline_mounts(data_dir: str | Path | None = None) -> list[BindMount]:
    """Read-only binds that make the offline image run this host's Python and this repo.

    /usr (libc, the dynamic loader, iproute2, maybe Python itself), the Python installation
    (sys.prefix / sys.base_prefix when they are outside /usr, e.g. pyenv or a venv), and the
    repo (an editable install points into it). Each at the same path as on the host, so every
    absolute path recorded by the Python installation still resolves; a venv's own path is mounted
    as given too (container_python() runs its bin/python link), and where it leads.
    """
    wanted = ["/usr"]
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)):
        wanted += [os.path.abspath(p), str(Path(p).resolve())]
    wanted.append(str(repo_root()))
    if data_dir is not None:
        wanted.append(str(Path(data_dir).resolve()))
    mounts: list[BindMount] = []
    for path in sorted(set(wanted), key=len):
        # skip paths inside one already mounted (the parent's bind covers them)
        if any(path == m.source or path.startswith(m.source.rstrip("/") + "/") for m in mounts):
            continue
        if Path(path).exists():
            mounts.append(BindMount(path, path, True))
    return mounts


def container_python() -> str:
    """The interpreter path inside offline-image containers: the host's, via the binds.

    Not resolved: in a virtualenv (python -m venv, uv's .venv) sys.executable is the venv's bin/python,
    a link to the base interpreter. Run through the link, Python finds the venv's pyvenv.cfg and its
    packages; the resolved base interpreter has none of them (every node died with "No module named
    'typer'"). The venv (sys.prefix) and the base installation are both bind-mounted."""
    return os.path.abspath(sys.executable)
