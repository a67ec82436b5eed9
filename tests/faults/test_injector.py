"""The injector against a live cluster: what each fault does to the proxies and processes, seen
from outside through toxiproxy-python and the process table, and that stop() undoes it all."""

from __future__ import annotations


import pytest

from smolcluster.common.wait import wait_until
from smolcluster.testbed.faults import FaultInjector, parse_faults, read_fault_log

pytestmark = pytest.mark.slow


def fault_toxics(cluster, proxy: str) -> dict[str, dict]:
    return {name: t for name, t in cluster.toxiproxy.get_proxy(proxy).toxics().items() if name.startswith("fault:")}


def test_network_and_process_faults_fire_heal_and_are_logged(cluster):
    c = cluster.control
    cluster.wait_version(5)
    now = c.elapsed()
    schedule = parse_faults([
        {"name": "cut-w2", "at": now, "node": "w2", "action": "partition"},
        {"name": "slow-w1", "at": now, "link": "srv->w1", "action": "latency_spike", "latency_ms": 150, "jitter_ms": 10, "duration": 1.0},
        {"name": "stop-w1", "at": now + 0.3, "node": "w1", "action": "pause"},
        {"name": "go-w1", "at": now + 1.5, "node": "w1", "action": "resume"},
        {"name": "heal-w2", "at": now + 2.0, "node": "w2", "action": "heal"},
        {"name": "later", "at_step": 10**9, "node": "w1", "action": "kill"},  # never due: stays pending
    ], c.topology)
    injector = FaultInjector(schedule, c, seed=1).start()
    try:
        # the partition disables w2's proxy; the latency spike adds named toxics on both streams of w1's
        wait_until(lambda: any(e["fault"] == "slow-w1" for e in injector.events), 5, interval=0.05, what="the first two faults fired")
        assert not cluster.toxiproxy.get_proxy("w2->srv").enabled
        toxics = fault_toxics(cluster, "w1->srv")
        assert set(toxics) == {"fault:slow-w1:upstream", "fault:slow-w1:downstream"}
        assert all(t.type == "latency" and t.attributes == {"latency": 150, "jitter": 10} for t in toxics.values())
        wait_until(lambda: cluster.state("w1") == "stopped", 5, interval=0.05, what="w1 paused (SIGSTOP)")
        # the spike heals itself after its duration; the link profile's own toxics stay
        wait_until(lambda: not fault_toxics(cluster, "w1->srv"), 5, interval=0.05, what="latency spike healed")
        assert cluster.toxiproxy.get_proxy("w1->srv").toxics()  # the 1 ms profile latency
        wait_until(lambda: cluster.state("w1") != "stopped", 5, interval=0.05, what="w1 resumed")
        wait_until(lambda: cluster.toxiproxy.get_proxy("w2->srv").enabled, 5, interval=0.05, what="w2 healed")
        assert not injector.done()  # the step-triggered kill is still pending
    finally:
        injector.stop()
    assert all(cluster.state(n) not in ("stopped", "gone") for n in ("srv", "w1", "w2"))

    log = read_fault_log(c.run_dir)
    fired = {e["fault"]: e for e in log if e["action"] == "fired"}
    healed = {e["fault"]: e for e in log if e["action"] == "healed"}
    assert set(fired) == {"cut-w2", "slow-w1", "stop-w1", "go-w1", "heal-w2"}
    assert fired["cut-w2"]["touched"] == ["w2->srv"] and fired["cut-w2"]["target_kind"] == "node"
    assert fired["slow-w1"]["kind"] == "latency_spike" and fired["slow-w1"]["version"] >= 5
    assert healed["slow-w1"]["reason"] == "duration over"
    assert healed["slow-w1"]["elapsed"] - fired["slow-w1"]["elapsed"] == pytest.approx(1.0, abs=0.5)
    assert healed["stop-w1"]["by"] == "go-w1" and healed["cut-w2"]["by"] == "heal-w2"
    assert not [e for e in log if e["action"] == "failed"]


def test_stop_heals_every_active_fault_and_the_run_goes_on(cluster):
    c = cluster.control
    cluster.wait_version(3)
    now = c.elapsed()
    schedule = parse_faults([
        {"name": "cut", "at": now, "link": "w1->srv", "action": "partition"},
        {"name": "thin", "at": now, "link": "w2->srv", "action": "bandwidth_collapse", "rate_kbps": 20},
        {"name": "cap", "at": now, "link": "w2->srv", "action": "data_limit", "bytes": 50000, "stream": "upstream"},
        {"name": "freeze", "at": now, "node": "w2", "action": "pause"},
    ], c.topology)
    injector = FaultInjector(schedule, c).start()
    wait_until(lambda: len([e for e in injector.events if e["action"] == "fired"]) == 4, 5, interval=0.05, what="all four fired")
    assert set(fault_toxics(cluster, "w2->srv")) == {"fault:thin:upstream", "fault:thin:downstream", "fault:cap:upstream"}
    assert cluster.state("w2") == "stopped"
    injector.stop()
    assert cluster.toxiproxy.get_proxy("w1->srv").enabled
    assert not fault_toxics(cluster, "w2->srv")
    assert cluster.state("w2") != "stopped"
    healed = [e for e in read_fault_log(c.run_dir) if e["action"] == "healed"]
    assert sorted(e["fault"] for e in healed) == ["cap", "cut", "freeze", "thin"]
    assert all(e["reason"] == "run ended" for e in healed)
    # healed for real: training moves on through both links again
    v = c.server_version()
    cluster.wait_version(v + 10, timeout=60)


def test_a_fault_that_cannot_be_applied_is_logged_as_failed_and_the_rest_still_fire(cluster):
    c = cluster.control
    cluster.wait_version(1)
    cluster.toxiproxy.get_proxy("w2->srv").destroy()  # someone removed the proxy behind our back
    now = c.elapsed()
    schedule = parse_faults([{"name": "gone", "at": now, "link": "w2->srv", "action": "slow_close", "delay_ms": 100},
                             {"name": "ok", "at": now + 0.2, "link": "w1->srv", "action": "connection_reset"}], c.topology)
    with FaultInjector(schedule, c) as injector:
        wait_until(lambda: any(e["fault"] == "ok" and e["action"] == "healed" for e in injector.events), 5, interval=0.05, what="reset healed")
    log = read_fault_log(c.run_dir)
    failed = [e for e in log if e["action"] == "failed"]
    assert [e["fault"] for e in failed] == ["gone"] and "w2->srv" in failed[0]["error"]
    assert [e["action"] for e in log if e["fault"] == "ok"] == ["fired", "healed"]
