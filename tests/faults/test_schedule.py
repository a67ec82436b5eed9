"""Fault schedules: parsing, errors that name the key and the fix, and seeded random expansion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from smolcluster.common.errors import ConfigError
from smolcluster.testbed.faults import load_faults_file, parse_faults, schedule_for
from smolcluster.testbed.topology import load_topology

SMALL = Path(__file__).resolve().parents[2] / "topologies" / "faults-small.yaml"
HYBRID = Path(__file__).resolve().parents[2] / "topologies" / "hybrid.yaml"


@pytest.fixture(scope="module")
def topo():
    return load_topology(SMALL)


def test_every_action_parses_with_its_target_trigger_and_parameters(topo):
    raw = [
        {"at": 1.5, "node": "w1", "action": "kill", "duration": 3},
        {"at_step": 10, "node": "w2", "action": "pause", "duration": 2},
        {"at": 4, "node": "w2", "action": "resume"},
        {"at": 5, "node": "w1", "action": "restart"},
        {"at_step": 40, "action": "server_crash"},
        {"at": 6, "link": "srv->w1", "action": "partition"},
        {"at": 7, "link": {"from": "w1", "to": "srv"}, "action": "heal"},
        {"at": 8, "node": "w2", "action": "latency_spike", "latency_ms": 250, "jitter_ms": 20, "duration": 1},
        {"at": 9, "link": "w2->srv", "action": "bandwidth_collapse", "rate_kbps": 64, "stream": "downstream"},
        {"at": 10, "link": "w2->srv", "action": "connection_reset"},
        {"at": 11, "link": "w2->srv", "action": "slow_close", "delay_ms": 500},
        {"name": "cap", "at": 12, "link": "w2->srv", "action": "data_limit", "bytes": 100000},
    ]
    faults = {f.action: f for f in parse_faults(raw, topo).expand()}
    assert len(faults) == 12
    assert faults["kill"].at == 1.5 and faults["kill"].duration == 3.0 and faults["kill"].target == "w1"
    assert faults["pause"].at_step == 10 and faults["pause"].at is None
    # server_crash targets the server by default and heals (restarts with --resume) after 2 s
    assert (faults["server_crash"].target, faults["server_crash"].duration) == ("srv", 2.0)
    # links are named worker side first, whichever way the entry wrote them
    assert faults["partition"].target == "w1->srv" and faults["heal"].target == "w1->srv"
    assert faults["latency_spike"].target_kind == "node"
    assert faults["latency_spike"].params == {"latency_ms": 250, "jitter_ms": 20, "stream": "both"}
    assert faults["bandwidth_collapse"].params == {"rate_kbps": 64, "stream": "downstream"}
    assert faults["connection_reset"].duration == 0.5  # a reset is a moment, not a state
    assert faults["data_limit"].name == "cap" and faults["data_limit"].params["bytes"] == 100000
    # time triggers first in time order, then step triggers
    order = parse_faults(raw, topo).expand()
    assert [f.at for f in order if f.at is not None] == sorted(f.at for f in order if f.at is not None)
    assert order[-1].at_step == 40


@pytest.mark.parametrize("entry, key, words", [
    ({"at": 1, "node": "w1", "action": "explode"}, "faults[0].action", "unknown action 'explode'"),
    ({"at": 1, "node": "w1", "action": "kil"}, "faults[0].action", "did you mean 'kill'"),
    ({"at": 1, "node": "w9", "action": "kill"}, "faults[0].node", "unknown node 'w9'"),
    ({"at": 1, "link": "w1->w2", "action": "partition"}, "faults[0].link", "not linked"),
    ({"at": 1, "link": "w1", "action": "partition"}, "faults[0].link", "expected 'A->B'"),
    ({"node": "w1", "action": "kill"}, "faults[0]", "missing trigger"),
    ({"at": 1, "at_step": 3, "node": "w1", "action": "kill"}, "faults[0]", "both at and at_step"),
    ({"at": 1, "node": "w1", "action": "pause", "duration": -2}, "faults[0].duration", "greater than 0"),
    ({"at": -1, "node": "w1", "action": "pause"}, "faults[0].at", "at least 0"),
    ({"at_step": 2.5, "node": "w1", "action": "pause"}, "faults[0].at_step", "expected an integer"),
    ({"at": 1, "link": "w1->srv", "action": "latency_spike"}, "faults[0].latency_ms", "needs latency_ms"),
    ({"at": 1, "link": "w1->srv", "action": "data_limit", "bytes": 0}, "faults[0].bytes", "greater than 0"),
    ({"at": 1, "link": "w1->srv", "action": "kill"}, "faults[0].link", "not on a link"),
    ({"at": 1, "node": "w1", "action": "server_crash"}, "faults[0].node", "hits the server"),
    ({"at": 1, "node": "w1", "action": "kill", "latency_ms": 3}, "faults[0].latency_ms", "unknown key"),
    ({"at": 1, "node": "w1", "action": "resume", "duration": 3}, "faults[0].duration", "cannot have a duration"),
    ({"at": 1, "link": "w1->srv", "action": "slow_close", "delay_ms": 5, "stream": "sideways"}, "faults[0].stream", "unknown stream"),
    ({"at": 1, "node": "w1"}, "faults[0].action", "missing"),
])
def test_bad_entries_name_the_key_and_the_fix(topo, entry, key, words):
    with pytest.raises(ConfigError) as err:
        parse_faults([entry], topo)
    assert err.value.key == key
    assert words in str(err.value)
    assert err.value.fix  # every error says how to fix it


def test_random_faults_same_seed_same_schedule_other_seed_other_schedule(topo):
    def draw(seed: int):
        raw = [{"random": {"seed": seed, "rate_per_min": 12, "actions": ["kill", "pause", "partition", "latency_spike", "server_crash"],
                           "duration": 2, "start": 5, "end": 120}}]
        return [f.to_dict() for f in parse_faults(raw, topo).expand()]

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b
    assert a != c
    assert 8 <= len(a) <= 45  # ~23 expected at 12/min over 115 s
    for f in a:
        assert 5 <= f["at"] < 120 and f["duration"] == 2 and f["origin"] == "random"
        if f["action"] == "server_crash":
            assert f["node"] == "srv"
        elif f["action"] in ("kill", "pause"):
            assert f["node"] in ("w1", "w2")  # default targets: the workers (and links for network faults)
        else:
            assert f.get("link") in ("w1->srv", "w2->srv") or f.get("node") in ("w1", "w2")
        if f["action"] == "latency_spike":
            assert f["latency_ms"] == 200  # the random default, overridable with params:
    assert {f["action"] for f in a} == {"kill", "pause", "partition", "latency_spike", "server_crash"}


def test_random_targets_and_params_are_respected_and_checked(topo):
    raw = [{"random": {"seed": 1, "rate_per_min": 30, "actions": ["latency_spike"], "targets": ["w2->srv"],
                       "params": {"latency_spike": {"latency_ms": 900}}, "end": 60}}]
    faults = parse_faults(raw, topo).expand()
    assert faults and all(f.target == "w2->srv" and f.params["latency_ms"] == 900 for f in faults)
    with pytest.raises(ConfigError, match="none of the targets fits kill"):
        parse_faults([{"random": {"seed": 1, "rate_per_min": 1, "actions": ["kill"], "targets": ["w1->srv"], "end": 9}}], topo)
    with pytest.raises(ConfigError, match="cannot be drawn at random"):
        parse_faults([{"random": {"seed": 1, "rate_per_min": 1, "actions": ["heal"], "end": 9}}], topo)
    with pytest.raises(ConfigError) as err:
        parse_faults([{"random": {"seed": 1, "rate_per_min": 1, "actions": ["kill"], "end": 0, "start": 5}}], topo)
    assert err.value.key == "faults[0].random.end"


def test_faults_file_and_topology_faults_are_combined(tmp_path):
    topo_file = tmp_path / "t.yaml"
    raw = yaml.safe_load(SMALL.read_text())
    raw["faults"] = [{"at": 3, "node": "w1", "action": "pause", "duration": 1}]
    topo_file.write_text(yaml.safe_dump(raw))
    faults_file = tmp_path / "faults.yaml"
    faults_file.write_text(yaml.safe_dump({"faults": [{"at_step": 5, "link": "w2->srv", "action": "partition", "duration": 2}]}))
    topo = load_topology(topo_file)
    combined = schedule_for(topo, faults_file).expand()
    assert [(f.action, f.target) for f in combined] == [("pause", "w1"), ("partition", "w2->srv")]

    faults_file.write_text(yaml.safe_dump({"faults": [{"at": 1, "node": "nobody", "action": "kill"}]}))
    with pytest.raises(ConfigError) as err:
        load_faults_file(faults_file, topo)
    assert err.value.file == str(faults_file) and err.value.key == "faults[0].node"
    faults_file.write_text(yaml.safe_dump({"fault": []}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_faults_file(faults_file, topo)


def test_multi_hop_links_on_the_hybrid_topology():
    topo = load_topology(HYBRID)
    f = parse_faults([{"at": 1, "link": "mini3->pi4", "action": "partition"}], topo).expand()[0]
    assert f.target == "pi4->mini3"
    with pytest.raises(ConfigError, match="not linked"):
        parse_faults([{"at": 1, "link": "pi4->mini1", "action": "partition"}], topo)


def test_random_without_a_seed_uses_the_runs_seed(topo):
    schedule = parse_faults([{"random": {"rate_per_min": 20, "actions": ["pause"], "end": 60}},
                             {"random": {"rate_per_min": 20, "actions": ["pause"], "end": 60}}], topo)
    a, b, c = schedule.expand(42), schedule.expand(42), schedule.expand(43)
    assert [f.to_dict() for f in a] == [f.to_dict() for f in b]
    assert [f.at for f in a] != [f.at for f in c]
    # two entries with the same settings still draw different faults
    first = [f.at for f in a if f.name.startswith("random0-")]
    second = [f.at for f in a if f.name.startswith("random1-")]
    assert first and second and first != second


def test_faults_show_prints_the_expanded_schedule(tmp_path):
    from typer.testing import CliRunner

    from smolcluster.cli import build_app

    faults_file = tmp_path / "f.yaml"
    faults_file.write_text(yaml.safe_dump({"faults": [
        {"at": 2, "node": "w1", "action": "pause", "duration": 1},
        {"random": {"seed": 5, "rate_per_min": 10, "actions": ["partition"], "targets": ["w2->srv"], "end": 30}}]}))
    result = CliRunner().invoke(build_app(), ["faults", "show", str(SMALL), "--faults", str(faults_file)])
    assert result.exit_code == 0, result.output
    assert "pause node w1 at 2s for 1s" in result.output
    drawn = parse_faults(yaml.safe_load(faults_file.read_text())["faults"], load_topology(SMALL)).expand()
    assert f"{len(drawn)} faults" in result.output and len(drawn) > 2
    assert result.output.count("partition link w2->srv") == len(drawn) - 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"faults": [{"at": 2, "node": "w1", "action": "pauze"}]}))
    result = CliRunner().invoke(build_app(), ["faults", "show", str(SMALL), "--faults", str(bad)])
    assert result.exit_code != 0 and "did you mean 'pause'" in str(result.exception or result.output)
