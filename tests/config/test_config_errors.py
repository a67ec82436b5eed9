"""Every bad config or topology is one ConfigError naming the file, the key and the fix — never a traceback.

One table: each row is a broken file (an edit of a shipped one, or text) and the key and words its
message must carry. The same inputs through the command line exit 2 with one `error:` line.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.core.training.config import load_run_config
from smolcluster.testbed.faults import schedule_for
from smolcluster.testbed.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
BASE = {"nn": REPO / "configs" / "nn_config.yaml", "cluster": REPO / "configs" / "cluster_config_edp.yaml",
        "topology": REPO / "topologies" / "hybrid.yaml"}
FILE_NAME = {"nn": "nn_config.yaml", "cluster": "cluster_config_edp.yaml", "topology": "topo.yaml"}

# Stands for a byte that is not UTF-8 (0xff) in a case's text.
NOT_UTF8 = "<0xff>"
# An alias bomb: each level doubles the one before; expanded it is 2**30 strings.
BOMB = "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 31))


@dataclass(frozen=True)
class Bad:
    kind: str  # nn | cluster | topology
    key: str  # the key the message names
    words: tuple[str, ...]  # in the message (problem or fix)
    edit: Callable[[dict], Any] | None = None  # changes the parsed base file
    text: Callable[[str], str] | str | None = None  # or: the file's text (a function of the base text)
    cli: bool = False  # also run through the command line


def nodes(*path: str, value: Any) -> Callable[[dict], None]:
    """An edit setting raw[path...] = value."""
    def edit(raw: dict) -> None:
        for p in path[:-1]:
            raw = raw[p]
        raw[path[-1]] = value
    return edit


def delete(*path: str) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        for p in path[:-1]:
            raw = raw[p]
        del raw[path[-1]]
    return edit


def both(*edits: Callable[[dict], Any]) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        for e in edits:
            e(raw)
    return edit


def append_route(raw: dict) -> None:
    # pi4 -> mini3, which now sends 10.10.0.1 back to pi4 (a /32 beats the attached /24)
    raw["nodes"]["pi4"]["forwarding"] = True
    raw["nodes"]["mini3"]["routes"].append({"dest": "10.10.0.1/32", "via": "192.168.51.4"})


CASES: dict[str, Bad] = {
    # --- topology: addresses, subnets, routes, profiles, roles, keys
    "duplicate-address": Bad("topology", "nodes.mini3.addresses.thunderbolt", ("own address", "mini2"),
                             nodes("nodes", "mini3", "addresses", "thunderbolt", value="10.10.0.2")),
    "address-outside-subnet": Bad("topology", "nodes.pi5.addresses.pi5-eth", ("192.168.50.0/24",),
                                  nodes("nodes", "pi5", "addresses", "pi5-eth", value="192.168.51.9")),
    "unknown-network": Bad("topology", "nodes.pi5.addresses.pi5-ethernet", ("pi5-eth",),
                           nodes("nodes", "pi5", "addresses", value={"pi5-ethernet": "192.168.50.2"})),
    "docker-gateway": Bad("topology", "nodes.mini2.addresses.thunderbolt", ("gateway",),
                          nodes("nodes", "mini2", "addresses", "thunderbolt", value="10.10.0.254")),
    "garbage-address": Bad("topology", "nodes.mini2.addresses.thunderbolt", ("not an IPv4 address",),
                           nodes("nodes", "mini2", "addresses", "thunderbolt", value=["10.10.0.2"]), cli=True),
    "route-via-nobody": Bad("topology", "nodes.pi4.routes[0].via", ("address of a node",),
                            lambda r: r["nodes"]["pi4"]["routes"][0].__setitem__("via", "192.168.51.3")),
    "route-via-non-forwarder": Bad("topology", "nodes.mini1.routes[0].via", ("nodes.mini3.forwarding: true",),
                                   nodes("nodes", "mini3", "forwarding", value=False)),
    "route-via-other-network": Bad("topology", "nodes.pi4.routes[0].via", ("pi4-eth", "thunderbolt"),
                                   lambda r: r["nodes"]["pi4"]["routes"][0].__setitem__("via", "10.10.0.3")),
    "no-path-to-server": Bad("topology", "nodes.pi4.routes", ("10.10.0.0/24", "pi4 has no route to 10.10.0.1",
                                                              "no path to the server mini1"), delete("nodes", "pi4", "routes")),
    "replies-cannot-come-back": Bad("topology", "nodes.mini1.routes", ("{dest: 192.168.51.0/24, via: 10.10.0.3}", "replies"),
                                    nodes("nodes", "mini1", "routes", value=[])),
    "routing-loop": Bad("topology", "nodes.mini3.routes", ("not back to pi4", "routing loop: pi4 -> mini3 -> pi4"), append_route),
    "unknown-link-profile": Bad("topology", "networks.pi4-eth.profile", ("ethernet-1g", "thunderbolt"),
                                nodes("networks", "pi4-eth", "profile", value="ethernet-10g")),
    "unknown-link-override": Bad("topology", "nodes.pi4.links.pi4-eth", ("ethernet-1g", "thunderbolt"),
                                 nodes("nodes", "pi4", "links", value={"pi4-eth": "carrier-pigeon"})),
    "unknown-device": Bad("topology", "nodes.pi4.device", ("raspberry-pi-4",), nodes("nodes", "pi4", "device", value="raspberry-pi-3")),
    "no-server": Bad("topology", "nodes", ("exactly one",), nodes("nodes", "mini1", "role", value="worker")),
    "two-servers": Bad("topology", "nodes", ("exactly one",), both(nodes("nodes", "mini1", "role", value="server"),
                                                                   nodes("nodes", "mini2", "role", value="server"))),
    "misspelt-role": Bad("topology", "nodes.mini1.role", ("server or worker",), nodes("nodes", "mini1", "role", value="srever")),
    "unknown-top-key": Bad("topology", "netwroks", ("remove it",), nodes("netwroks", value={})),
    "unknown-node-key": Bad("topology", "nodes.pi5.forward", ("remove it",), nodes("nodes", "pi5", "forward", value=True)),
    "unknown-network-key": Bad("topology", "networks.thunderbolt.mtu", ("remove it",), nodes("networks", "thunderbolt", "mtu", value=9000)),
    "unknown-route-key": Bad("topology", "nodes.pi5.routes[0].gw", ("remove it",),
                             lambda r: r["nodes"]["pi5"]["routes"][0].__setitem__("gw", "1.2.3.4")),
    "unknown-training-key": Bad("topology", "training.epoch", ("remove it", "did you mean 'epochs'?"),
                                nodes("training", "epoch", value=2)),
    "subnet-host-bits": Bad("topology", "networks.thunderbolt.subnet", ("10.10.0.0/24",),
                            nodes("networks", "thunderbolt", "subnet", value="10.10.0.1/24")),
    "overlapping-subnets": Bad("topology", "networks.pi4-eth.subnet", ("non-overlapping", "pi5-eth"),
                               nodes("networks", "pi4-eth", "subnet", value="192.168.48.0/22")),
    "training-algorithm": Bad("topology", "training.algorithm", ("edp or syncps",), nodes("training", "algorithm", value="allreduce")),
    "training-derived-key": Bad("topology", "training.host_ip", ("nodes",), nodes("training", "host_ip", value={"mini2": "10.10.0.1"})),
    "faults-not-a-list": Bad("topology", "faults", ("faults: []",), nodes("faults", value={"at": 10, "kill": "pi4"})),
    # --- topology: what `topology validate` missed (issue 13, item 14)
    "training-passthrough-type": Bad("topology", "training.idle_timeout", ("expected a number",),
                                     nodes("training", "idle_timeout", value="soon"), cli=True),
    "training-passthrough-range": Bad("topology", "training.model.hidden", ("at least 1",),
                                      nodes("training", "model", value={"hidden": -5}), cli=True),
    "training-epochs-range": Bad("topology", "training.epochs", ("at least 1",), nodes("training", "epochs", value=0)),
    "fault-entry": Bad("topology", "faults[0].node", ("unknown node 'nobody'",),
                       nodes("faults", value=[{"at": 1, "node": "nobody", "action": "kill"}]), cli=True),
    "topology-duplicate-key": Bad("topology", "nodes", ("given twice", "keep one"),
                                  text=lambda t: t.replace("\nnodes:\n", "\nnodes: {}\nnodes:\n", 1), cli=True),
    "topology-not-utf8": Bad("topology", "<file>", ("line 1", "UTF-8"), text=lambda t: f"# caf{NOT_UTF8}\n" + t, cli=True),
    "topology-alias-bomb": Bad("topology", "<file>", ("alias",), text=lambda t: t + "bomb:\n" + "".join(
        f"  {line}\n" for line in BOMB.splitlines()), cli=True),
    "topology-bad-yaml": Bad("topology", "<file>", ("YAML",), text="networks:\n  lan: {subnet: 10.0.0.0/24\nnodes: ["),
    # --- nn_config.yaml
    "nn-batch-size": Bad("nn", "batch_size", ("at least 1", "use e.g. 32"), nodes("batch_size", value=0)),
    "nn-bool-for-number": Bad("nn", "learning_rate", ("expected a number",), nodes("learning_rate", value=True)),
    "nn-optimizer": Bad("nn", "optimizer", ("adam or sgd",), nodes("optimizer", value="lion")),
    "nn-polyak": Bad("nn", "polyak_alpha", ("server weights",), nodes("polyak_alpha", value=1.5)),
    "nn-clipping-negative": Bad("nn", "gradient_clipping", ("greater than 0",), nodes("gradient_clipping", value={"enabled": True, "max_norm": -1})),
    "nn-clipping-enabled": Bad("nn", "gradient_clipping.enabled", ("true or false",), nodes("gradient_clipping", value={"enabled": "maybe"})),
    "nn-clipping-key": Bad("nn", "gradient_clipping.max", ("max_norm",), nodes("gradient_clipping", value={"max": 1.0})),
    "nn-unknown-key": Bad("nn", "batchsize", ("did you mean 'batch_size'?",), nodes("batchsize", value=32)),
    "nn-model-type": Bad("nn", "model.type", ("SimpleNN or GPT",), nodes("model", "type", value="ResNet")),
    "nn-dataset": Bad("nn", "dataset", ("MNIST",), nodes("dataset", value={"name": "CIFAR"})),
    "nn-device": Bad("nn", "device", ("auto, cpu, mps or cuda",), nodes("device", value="tpu")),
    "nn-huge-hidden": Bad("nn", "model.hidden", ("at most",), nodes("model", "hidden", value=10**12), cli=True),
    "nn-hidden-as-text": Bad("nn", "model.hidden", ("expected an integer",), text=lambda t: t.replace("hidden: 128", "hidden: 1e12"), cli=True),
    "nn-not-utf8": Bad("nn", "<file>", ("line 2", "UTF-8"), text=f"batch_size: 32\n# {NOT_UTF8}\n", cli=True),
    # --- cluster_config_edp.yaml
    "cluster-algorithm-key": Bad("cluster", "algorithm", ("--algo", "remove it"), nodes("algorithm", value="edp"), cli=True),
    "cluster-server-missing": Bad("cluster", "server", ("missing", "server: mini1"), delete("server"), cli=True),
    "cluster-num-workers": Bad("cluster", "num_workers", ("make them agree",), nodes("num_workers", value=3)),
    "cluster-worker-without-address": Bad("cluster", "host_ip", ("pi4",), delete("host_ip", "pi4")),
    "cluster-server-is-worker": Bad("cluster", "workers", ("server_trains",), nodes("workers", value=["mini1", "mini2", "mini3", "pi5"])),
    "cluster-port": Bad("cluster", "port", ("at most 65535",), nodes("port", value=70000)),
    "cluster-seed-beyond-64-bits": Bad("cluster", "seed", ("at most",), nodes("seed", value=2**70), cli=True),
    "cluster-heartbeat-inf": Bad("cluster", "heartbeat_timeout", ("finite",), text=lambda t: t + "heartbeat_timeout: .inf\n", cli=True),
    "cluster-idle-negative": Bad("cluster", "idle_timeout", ("greater than 0",), nodes("idle_timeout", value=-1), cli=True),
    "cluster-idle-nan": Bad("cluster", "idle_timeout", ("finite",), text=lambda t: t + "idle_timeout: .nan\n", cli=True),
    "cluster-timeout": Bad("cluster", "timeout", ("greater than 0 seconds", "use e.g. 1.0"), nodes("timeout", value=-1.0)),
    "cluster-heartbeat-order": Bad("cluster", "heartbeat_timeout", ("exceed heartbeat_interval",),
                                   both(nodes("heartbeat_interval", value=5.0), nodes("heartbeat_timeout", value=2.0))),
    "cluster-push-mode": Bad("cluster", "push_mode", ("weights or gradients",), nodes("push_mode", value="deltas")),
    "cluster-duplicate-key": Bad("cluster", "port", ("given twice (lines",), text=lambda t: t + "port: 1234\n", cli=True),
    "cluster-garbage-host-ip": Bad("cluster", "host_ip.pi5", ("not an IP address or hostname",),
                                   nodes("host_ip", "pi5", value="10.10.0.300"), cli=True),
    "cluster-host-ip-not-text": Bad("cluster", "host_ip.pi5", ("not an IP address or hostname",), nodes("host_ip", "pi5", value=[1, 2])),
    "cluster-alias-bomb": Bad("cluster", "<file>", ("alias",), text=lambda t: t.replace("host_ip:\n", BOMB + "host_ip:\n", 1), cli=True),
}


def write_case(tmp_path: Path, case: Bad) -> tuple[Path, Path]:
    """The broken file in a fresh dir (beside an unchanged copy of the other config); (dir, broken file)."""
    base = BASE[case.kind].read_text()
    if case.text is not None:
        body = case.text(base) if callable(case.text) else case.text
    else:
        raw = copy.deepcopy(yaml.safe_load(base))
        case.edit(raw)
        body = yaml.safe_dump(raw, sort_keys=False)
    path = tmp_path / FILE_NAME[case.kind]
    path.write_bytes(body.encode().replace(NOT_UTF8.encode(), b"\xff"))
    for kind in ("nn", "cluster"):
        if kind != case.kind:
            (tmp_path / FILE_NAME[kind]).write_text(BASE[kind].read_text())
    return tmp_path, path


def load(case: Bad, folder: Path, path: Path) -> None:
    if case.kind == "topology":
        schedule_for(load_topology(path))  # what `smolcluster topology validate` checks
    else:
        load_run_config(folder, "edp")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_file_key_and_fix(tmp_path: Path, name: str):
    case = CASES[name]
    folder, path = write_case(tmp_path, case)
    with pytest.raises(ConfigError) as info:
        load(case, folder, path)
    err, msg = info.value, str(info.value)
    assert err.file == str(path) and msg.startswith(f"{path}: key '{case.key}': "), msg
    assert err.key == case.key, msg
    assert err.fix and "(fix: " in msg, msg
    for word in case.words:
        assert word in msg, f"{word!r} not in: {msg}"
    assert len(msg) < 1000, msg  # no value (an alias bomb, a huge list) printed in full


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolcluster", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.cli])
def test_the_command_line_says_it_in_one_error_line(tmp_path: Path, name: str):
    case = CASES[name]
    folder, path = write_case(tmp_path, case)
    out = (cli("topology", "validate", str(path)) if case.kind == "topology"
           else cli("launch", "--algo", "edp", "--config-dir", str(folder), "--dry-run"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: key '{case.key}'") and "(fix: " in lines[0], out.stderr


def test_a_checkpoint_dir_that_cannot_be_created(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    folder, _ = write_case(tmp_path, Bad("cluster", "", (), nodes("checkpoint_dir", value=str(tmp_path / "a-file" / "ckpt"))))
    out = cli("server", "--algo", "edp", "--config-dir", str(folder), "--run-dir", str(tmp_path / "run"), "--port", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder / 'cluster_config_edp.yaml'}: key 'checkpoint_dir': cannot create"), last
    assert "RUN_DIR/checkpoints" in last


def many_nodes(macs: int) -> dict:
    """A server and `macs` Macs on one /16, each Mac with a Pi on its own /29 behind it; the server
    has a return route per Pi subnet, each Pi a route to the /16 via its Mac (2 * macs + 1 nodes)."""
    networks = {"lan": {"subnet": "10.0.0.0/16", "profile": "ethernet-1g"}}
    nodes_: dict[str, dict] = {}
    server_routes = []

    def addr(n: int) -> str:
        return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))

    for i in range(macs):
        base = (172 << 24) | (16 << 16) | (i * 8)  # 172.16.0.0/29, 172.16.0.8/29, ... (.6 is the docker gateway)
        mac_lan = addr((10 << 24) | (i + 2))  # 10.0.0.2 ...
        networks[f"p{i}"] = {"subnet": f"{addr(base)}/29", "profile": "ethernet-1g"}
        nodes_[f"mac{i}"] = {"role": "worker", "device": "mac-mini", "forwarding": True,
                             "addresses": {"lan": mac_lan, f"p{i}": addr(base + 1)}}
        nodes_[f"pi{i}"] = {"role": "worker", "device": "raspberry-pi-5", "addresses": {f"p{i}": addr(base + 2)},
                            "routes": [{"dest": "10.0.0.0/16", "via": addr(base + 1)}]}
        server_routes.append({"dest": f"{addr(base)}/29", "via": mac_lan})
    nodes_ = {"srv": {"role": "server", "device": "mac-mini", "addresses": {"lan": "10.0.0.1"}, "routes": server_routes}} | nodes_
    return {"networks": networks, "nodes": nodes_}


@pytest.mark.slow
def test_validation_time_grows_linearly(tmp_path: Path):
    """Validation was quadratic (an address scan per route and hop, a route scan per lookup, every subnet
    against every other): 20k nodes took 127 s. A 4x bigger topology must take well under 16x as long.
    CPU time of this process, not wall time: other jobs on the machine stretch the wall clock, not this."""
    def seconds(macs: int) -> float:
        path = tmp_path / f"t{macs}.yaml"
        path.write_text(yaml.safe_dump(many_nodes(macs), sort_keys=False))
        t0 = time.process_time()
        topo = load_topology(path)
        assert len(topo.workers) == 2 * macs
        return time.process_time() - t0

    seconds(250)  # warm up (imports, profiles)
    small, big = min(seconds(1250) for _ in range(2)), min(seconds(5000) for _ in range(2))
    assert big / small < 8, f"2,501 nodes {small:.2f} s, 10,001 nodes {big:.2f} s of CPU"
