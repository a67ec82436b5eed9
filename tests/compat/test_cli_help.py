"""The command line's help says what the code does: no option that does not exist, --bind as bound."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typing import Any
import pytest
import typer

from compat_helpers import tail, wait_until

from smolcluster.cli import build_app


def all_commands(group: Any, path: str = "") -> dict[str, Any]:
    out = {path.strip(): group}
    if hasattr(group, "commands"):  # a group (typer may bring its own click)
        for name, cmd in group.commands.items():
            out |= all_commands(cmd, f"{path} {name}")
    return out


def test_help_texts_name_only_options_that_exist():
    commands = all_commands(typer.main.get_command(build_app()))
    options = {o for cmd in commands.values() for p in cmd.params for o in getattr(p, "opts", [])}
    for name, cmd in commands.items():
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for mentioned in re.findall(r"(?<![\w-])--[a-z][a-z-]+", " ".join(texts)):
            assert mentioned in options, f"`smolcluster {name}` help mentions {mentioned}, which no command has"


def test_keygen_help_says_where_nodes_read_the_key():
    keygen = all_commands(typer.main.get_command(build_app()))["keygen"]
    assert "cluster_key_file" in keygen.help and "SMOLCLUSTER_CLUSTER_KEY" in keygen.help


@pytest.mark.slow
def test_server_binds_what_its_help_says(procs, tmp_path: Path, mnist_dir: Path):
    server = all_commands(typer.main.get_command(build_app()))["server"]
    bind_help = next(p.help for p in server.params if p.name == "bind")
    assert "0.0.0.0" in bind_help
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "nn_config.yaml").write_text(f"data_dir: {mnist_dir}\n")
    (cfg / "cluster_config_edp.yaml").write_text("host_ip: {w1: 127.0.0.1}\nworkers: [w1]\nnum_workers: 1\nserver: s\nwandb: off\n")
    run = tmp_path / "run"
    procs.start("s", ["server", "--algo", "edp", "--config-dir", str(cfg), "--run-dir", str(run), "--port", "0"], run / "stdout.log")
    wait_until(lambda: (run / "server.json").exists() or not procs.procs["s"].alive(), 60, "server.json")
    assert json.loads((run / "server.json").read_text())["host"] == "0.0.0.0", tail(run / "stdout.log")
    assert "listening on 0.0.0.0" in (run / "server.log").read_text() and "WITHOUT a cluster key" in (run / "server.log").read_text()
