"""Sync: the package, the run's configs, MNIST where a host has none, and the cluster key (0600).

The package is copied as installed here (an editable checkout or site-packages alike): its .py files
and its shipped profiles/topologies/configs (links followed), never runs/, .git, virtualenvs or caches.
The key goes through ssh's stdin, so it is on no command line and in no process listing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from smolcluster.core.training.data import resolve_data_dir
from smolcluster.deploy.hosts import quote_path
from smolcluster.deploy.plan import DATA_SUBDIR, KEY_FILE, TEXT_SUBDIR, DeployPlan, NodePlan
from smolcluster.testbed.sim.plan import GPT_CONFIG_NAME
from smolcluster.deploy.preflight import Check
from smolcluster.deploy.probe import MNIST_FILES
from smolcluster.deploy.runner import Runner

EXCLUDES = ("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "*.egg-info")


def package_dir() -> Path:
    import smolcluster

    return Path(smolcluster.__file__).resolve().parent


def local_mnist_files() -> list[Path]:
    """The MNIST files this machine would give a host that has none ($SMOLCLUSTER_DATA_DIR or the cache)."""
    try:
        folder = resolve_data_dir(None)
    except Exception:  # noqa: BLE001 - no data here is a preflight warning, not an error
        return []
    if folder is None or not Path(folder).is_dir():
        return []
    out = []
    for name in MNIST_FILES:
        for candidate in (Path(folder) / f"{name}.gz", Path(folder) / name):
            if candidate.is_file():
                out.append(candidate)
                break
    return out if len(out) == len(MNIST_FILES) else []


def local_text_files() -> list[Path]:
    """The WikiText-2 split files this machine has ($SMOLCLUSTER_TEXT_DIR, else the download cache)."""
    from smolcluster.core.training.wikitext import default_cache_dir, find_splits, resolve_text_dir

    folder = resolve_text_dir(None) or default_cache_dir()
    return sorted(find_splits(folder).values()) if folder.is_dir() else []


def sync_node(runner: Runner, plan: DeployPlan, node: NodePlan, key: bytes, *, needs_data: bool) -> list[Check]:
    if node.host.is_windows:
        return sync_windows_node(runner, plan, node, key, needs_data=needs_data)
    wd = quote_path(node.host.spec.workdir)
    cfg = plan.remote_config_dir()
    res = runner.ssh(node.host, f"mkdir -p {wd}/{cfg} {wd}/{DATA_SUBDIR} {wd}/{TEXT_SUBDIR} {wd}/.smolcluster && "
                                f"chmod 700 {wd}/.smolcluster")
    if not res.ok:
        return [_failed(node, f"cannot create {node.host.spec.workdir}: {res.reason()}",
                        f"check nodes.{node.name}.host.workdir and its permissions")]
    remote = node.host.spec.workdir.rstrip("/")
    pkg = package_dir()
    steps: list[tuple[str, list[str], str, dict]] = [
        ("code", [f"{pkg}/"], f"{remote}/smolcluster/", {"delete": True, "copy_links": True, "excludes": EXCLUDES}),
        ("configs", [f"{plan.config_dir}/"], f"{remote}/{cfg}/", {}),
    ]
    extras = [str(p) for p in (pkg.parent / "pyproject.toml", pkg.parent / "README.md") if p.is_file()]
    if extras:  # lets a user `pip install -e WORKDIR` there for the dependencies
        steps.append(("project files", extras, f"{remote}/", {}))
    data = local_mnist_files() if needs_data else []
    if data:
        steps.append(("data", [str(p) for p in data], f"{remote}/{DATA_SUBDIR}/", {}))
    text = local_text_files() if (plan.config_dir / GPT_CONFIG_NAME).is_file() else []
    if text:  # a GPT run: WikiText-2 (a few MB; rsync skips it when the host has it already)
        steps.append(("WikiText-2", [str(p) for p in text], f"{remote}/{TEXT_SUBDIR}/", {}))
    for what, sources, dest, kw in steps:
        res = runner.rsync(node.host, sources, dest, **kw)  # rsync's remote shell expands a leading ~
        if not res.ok:
            return [_failed(node, f"rsync of the {what} failed: {res.reason()}",
                            "is rsync installed on both ends, and the workdir writable?")]
    # The key last, through stdin: written to a temp file with umask 077, then renamed into place.
    res = runner.ssh(node.host, f"umask 077 && cat > {wd}/{KEY_FILE}.tmp && mv -f {wd}/{KEY_FILE}.tmp {wd}/{KEY_FILE}",
                     stdin=key)
    if not res.ok:
        return [_failed(node, f"could not install the cluster key: {res.reason()}", "")]
    what = "code, configs" + (", MNIST" if data else "") + (", WikiText-2" if text else "") + ", key"
    return [Check(node.name, "sync", "ok", f"{what} -> {node.host.spec.workdir}", phase="sync")]


def sync_windows_node(runner: Runner, plan: DeployPlan, node: NodePlan, key: bytes, *, needs_data: bool) -> list[Check]:
    """Windows has OpenSSH (scp) but rarely rsync: folders are copied whole with scp -r."""
    from smolcluster.deploy.status import powershell

    wd = node.host.spec.workdir.replace("~", "$HOME")
    cfg = plan.remote_config_dir().replace("/", "\\")
    mk = (f'New-Item -ItemType Directory -Force -Path "{wd}\\{cfg}", "{wd}\\data\\mnist", "{wd}\\.smolcluster" | Out-Null')
    res = runner.ssh_raw(node.host, powershell(mk))
    if not res.ok:
        return [_failed(node, f"cannot create {node.host.spec.workdir}: {res.reason()}", f"check nodes.{node.name}.host.workdir")]
    remote = node.host.spec.workdir.rstrip("/")
    copies = [([str(package_dir())], f"{remote}/"), ([str(p) for p in plan.config_dir.glob("*.yaml")], f"{remote}/{plan.remote_config_dir()}/")]
    data = local_mnist_files() if needs_data else []
    if data:
        copies.append(([str(p) for p in data], f"{remote}/{DATA_SUBDIR}/"))
    for sources, dest in copies:
        res = runner.scp(node.host, sources, dest)
        if not res.ok:
            return [_failed(node, f"scp to {dest} failed: {res.reason()}", "is the OpenSSH server's sftp subsystem on?")]
    put_key = (f'$k = [Console]::In.ReadToEnd(); Set-Content -NoNewline -Path "{wd}\\.smolcluster\\cluster.key" -Value $k; '
               f'icacls "{wd}\\.smolcluster\\cluster.key" /inheritance:r /grant:r "$($env:USERNAME):F" | Out-Null')
    res = runner.ssh_raw(node.host, powershell(put_key), stdin=key)
    if not res.ok:
        return [_failed(node, f"could not install the cluster key: {res.reason()}", "")]
    return [Check(node.name, "sync", "ok", f"code, configs{', MNIST' if data else ''}, key -> {node.host.spec.workdir} (scp)", phase="sync")]


def _failed(node: NodePlan, message: str, fix: str) -> Check:
    return Check(node.name, "sync", "fail", message, fix, phase="sync")


def sync(runner: Runner, plan: DeployPlan, key: bytes, facts: dict[str, dict],
         echo: Callable[[str], None]) -> bool:
    """Sync every host in parallel; print one line per host. True when all succeeded."""
    def one(node: NodePlan) -> list[Check]:
        needs_data = len(facts.get(node.name, {}).get("mnist_present", [])) < len(MNIST_FILES)
        return sync_node(runner, plan, node, key, needs_data=needs_data or runner.dry_run)

    results = runner.map(one, plan.nodes)
    ok = True
    for checks in results:
        for c in checks:
            echo(c.line())
            ok &= c.level != "fail"
    return ok
