"""The embedded proxy speaks Toxiproxy's HTTP API: driven by toxiproxy-python unchanged, and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from smolcluster.common.errors import ProxyError
from smolcluster.testbed.linkemu import ToxiproxyClient, ToxiproxyServer

from linkemu_net import echo, port_of, recv_exact

# One example per toxic type: attributes given, and the full attribute set the API reports back.
TOXICS = {
    "latency": ({"latency": 50, "jitter": 5}, {"latency": 50, "jitter": 5}),
    "bandwidth": ({"rate": 100}, {"rate": 100}),
    "slow_close": ({"delay": 100}, {"delay": 100}),
    "timeout": ({"timeout": 0}, {"timeout": 0}),
    "reset_peer": ({}, {"timeout": 0}),
    "slicer": ({"average_size": 64, "size_variation": 32}, {"average_size": 64, "size_variation": 32, "delay": 0}),
    "limit_data": ({"bytes": 10}, {"bytes": 10}),
}


@pytest.fixture
def tp(server: ToxiproxyServer) -> Iterator[Toxiproxy]:
    """toxiproxy-python pointed at the embedded server (it keeps host/port on a class)."""
    saved = APIConsumer.host, APIConsumer.port
    t = Toxiproxy()
    t.update_api_consumer("127.0.0.1", server.api_port)
    yield t
    APIConsumer.host, APIConsumer.port = saved


def raw(server: ToxiproxyServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.api_port, timeout=10)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        text = resp.read()
        return resp.status, (json.loads(text) if text.strip() else None)
    finally:
        conn.close()


def test_version_and_proxy_lifecycle_through_toxiproxy_python(tp: Toxiproxy, upstreams, clients) -> None:
    up = upstreams(echo)
    assert tp.running()
    assert b"version" in tp.version()

    proxy = tp.create(upstream=up.address, name="link", listen="127.0.0.1:0")
    assert proxy.enabled is True and port_of(proxy.listen) != 0  # the real port is reported back
    assert set(tp.proxies()) == {"link"}
    got = tp.get_proxy("link")
    assert (got.listen, got.upstream, got.enabled) == (proxy.listen, up.address, True)

    s = socket.create_connection(("127.0.0.1", port_of(proxy.listen)))
    clients.append(s)
    s.sendall(b"ping")
    assert recv_exact(s, 4) == b"ping"

    with pytest.raises(ProxyExists):
        tp.create(upstream=up.address, name="link")

    assert tp.destroy(proxy) is True
    assert tp.proxies() == {}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_of(proxy.listen)), timeout=2).close()
    with pytest.raises(NotFound):
        proxy.destroy()


@pytest.mark.parametrize("kind", sorted(TOXICS))
def test_every_toxic_type_created_listed_updated_removed(kind: str, tp: Toxiproxy, server: ToxiproxyServer, upstreams) -> None:
    up = upstreams(echo)
    proxy = tp.create(upstream=up.address, name="link")
    given, reported = TOXICS[kind]

    proxy.add_toxic(type=kind, attributes=given)  # default stream downstream, name <type>_<stream>
    proxy.add_toxic(type=kind, stream="upstream", name="mine", toxicity=0.5, attributes=given)
    toxics = proxy.toxics()
    assert set(toxics) == {f"{kind}_downstream", "mine"}
    down = toxics[f"{kind}_downstream"]
    assert (down.type, down.stream, down.toxicity, down.attributes) == (kind, "downstream", 1.0, reported)
    assert (toxics["mine"].stream, toxics["mine"].toxicity) == ("upstream", 0.5)
    # Listing order is Toxiproxy's: upstream toxics first.
    status, listed = raw(server, "GET", "/proxies/link/toxics")
    assert status == 200 and [t["name"] for t in listed] == ["mine", f"{kind}_downstream"]

    # Update (POST, as Toxiproxy clients do; PATCH too): attributes merge, toxicity replaced.
    key = next(iter(reported))
    status, updated = raw(server, "POST", f"/proxies/link/toxics/{kind}_downstream", {"attributes": {key: reported[key] + 1}})
    assert status == 200 and updated["attributes"] == {**reported, key: reported[key] + 1}
    status, updated = raw(server, "PATCH", "/proxies/link/toxics/mine", {"toxicity": 0.25})
    assert status == 200 and updated["toxicity"] == 0.25 and updated["attributes"] == reported
    assert tp.get_proxy("link").get_toxic("mine").toxicity == 0.25

    assert proxy.destroy_toxic(f"{kind}_downstream") is True
    assert set(proxy.toxics()) == {"mine"}
    proxy.destroy_toxic("mine")
    assert proxy.toxics() == {}


def test_reset_enables_proxies_and_removes_toxics(tp: Toxiproxy, upstreams, clients) -> None:
    up = upstreams(echo)
    a = tp.create(upstream=up.address, name="a")
    b = tp.create(upstream=up.address, name="b")
    a.add_toxic(type="latency", attributes={"latency": 1000})
    b.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    a.disable()
    assert tp.get_proxy("a").enabled is False

    assert tp.reset() is True
    proxies = tp.proxies()
    assert all(p.enabled for p in proxies.values())
    assert proxies["a"].toxics() == {} and proxies["b"].toxics() == {}
    s = socket.create_connection(("127.0.0.1", port_of(a.listen)), timeout=2)  # same port after re-enable
    clients.append(s)
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"


def test_disable_and_enable_through_toxiproxy_python(tp: Toxiproxy, upstreams, clients) -> None:
    up = upstreams(echo)
    proxy = tp.create(upstream=up.address, name="link")
    port = port_of(proxy.listen)
    s = socket.create_connection(("127.0.0.1", port))
    clients.append(s)
    s.sendall(b"a")
    assert recv_exact(s, 1) == b"a"
    with proxy.down():
        assert tp.get_proxy("link").enabled is False
        s.settimeout(5)
        assert s.recv(1) == b""  # the open connection was cut
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    s2 = socket.create_connection(("127.0.0.1", port), timeout=2)
    clients.append(s2)
    s2.sendall(b"b")
    assert recv_exact(s2, 1) == b"b"


def test_populate_creates_keeps_and_replaces(tp: Toxiproxy, server: ToxiproxyServer, upstreams) -> None:
    up1, up2 = upstreams(echo), upstreams(echo)
    created = tp.populate([{"name": "a", "upstream": up1.address, "listen": "127.0.0.1:0"}, {"name": "b", "upstream": up1.address, "listen": "127.0.0.1:0"}])
    assert sorted(p.name for p in created) == ["a", "b"]
    a = tp.get_proxy("a")
    # Same listen and upstream: kept as is. Other upstream: replaced.
    status, body = raw(server, "POST", "/populate", [{"name": "a", "upstream": up1.address, "listen": a.listen}, {"name": "b", "upstream": up2.address}])
    assert status == 201
    assert {p["name"]: p["upstream"] for p in body["proxies"]} == {"a": up1.address, "b": up2.address}
    assert tp.get_proxy("a").listen == a.listen


def test_status_codes_and_error_bodies(server: ToxiproxyServer, upstreams) -> None:
    up = upstreams(echo)
    status, body = raw(server, "POST", "/proxies", {"name": "p", "upstream": up.address, "listen": "127.0.0.1:0"})
    assert status == 201 and body["name"] == "p" and body["enabled"] is True and body["toxics"] == []
    assert raw(server, "POST", "/proxies", {"name": "p", "upstream": up.address})[0] == 409
    assert raw(server, "POST", "/proxies", {"name": "q"})[0] == 400  # no upstream
    assert raw(server, "POST", "/proxies", b"{not json")[0] == 400
    status, body = raw(server, "GET", "/proxies/nope")
    assert status == 404 and body["status"] == 404 and "not found" in body["error"]
    assert raw(server, "DELETE", "/proxies/nope")[0] == 404
    assert raw(server, "GET", "/proxies/nope/toxics")[0] == 404
    assert raw(server, "POST", "/proxies/nope/toxics", {"type": "latency"})[0] == 404

    status, body = raw(server, "POST", "/proxies/p/toxics", {"type": "latency", "attributes": {"latency": 10}})
    assert status == 200 and body["name"] == "latency_downstream"  # Toxiproxy answers 200 here
    assert raw(server, "POST", "/proxies/p/toxics", {"type": "latency"})[0] == 409
    for bad in (
        {"type": "nosuchtoxic"},
        {"type": "latency", "stream": "sideways"},
        {"type": "latency", "name": "x", "attributes": {"latency": -1}},
        {"type": "latency", "name": "x", "attributes": {"latency": "slow"}},
        {"type": "bandwidth", "name": "x", "attributes": {"rate_kbps": 10}},
        {"type": "slicer", "name": "x", "attributes": {"average_size": 0}},
        {"type": "latency", "name": "x", "toxicity": 2},
    ):
        status, body = raw(server, "POST", "/proxies/p/toxics", bad)
        assert status == 400 and body["error"], bad
    assert raw(server, "GET", "/proxies/p/toxics/nope")[0] == 404
    assert raw(server, "POST", "/proxies/p/toxics/nope", {"attributes": {}})[0] == 404
    assert raw(server, "DELETE", "/proxies/p/toxics/nope")[0] == 404
    assert raw(server, "POST", "/proxies/p/toxics/latency_downstream", {"attributes": {"latency": -5}})[0] == 400
    assert raw(server, "DELETE", "/proxies/p/toxics/latency_downstream") == (204, None)
    assert raw(server, "DELETE", "/proxies/p") == (204, None)
    assert raw(server, "POST", "/reset") == (204, None)
    assert raw(server, "GET", "/nothing/here")[0] == 404
    # Like Toxiproxy, refuse browsers: a web page must not reconfigure the network.
    assert raw(server, "GET", "/proxies", headers={"User-Agent": "Mozilla/5.0"})[0] == 403


def test_toxiproxy_python_error_mapping(tp: Toxiproxy, upstreams) -> None:
    proxy = tp.create(upstream=upstreams(echo).address, name="link")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="nosuchtoxic")
    proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(ProxyExists):
        proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(NotFound):
        proxy.destroy_toxic("nope")


def test_own_client_round_trip(client: ToxiproxyClient, upstreams) -> None:
    up = upstreams(echo)
    assert client.version()
    made = client.create_proxy("link", "127.0.0.1:0", up.address)
    assert port_of(made["listen"]) != 0
    t = client.add_toxic("link", "bandwidth", {"rate": 10}, stream="upstream")
    assert t == {"name": "bandwidth_upstream", "type": "bandwidth", "stream": "upstream", "toxicity": 1.0, "attributes": {"rate": 10}}
    assert client.update_toxic("link", "bandwidth_upstream", {"rate": 20})["attributes"] == {"rate": 20}
    assert client.get_toxic("link", "bandwidth_upstream")["attributes"] == {"rate": 20}
    assert [x["name"] for x in client.toxics("link")] == ["bandwidth_upstream"]
    assert client.disable("link")["enabled"] is False
    assert client.enable("link")["enabled"] is True
    client.remove_toxic("link", "bandwidth_upstream")
    with pytest.raises(ProxyError) as e:
        client.remove_toxic("link", "bandwidth_upstream")
    assert e.value.status == 404
    with pytest.raises(ProxyError) as e:
        client.create_proxy("link", "127.0.0.1:0", up.address)
    assert e.value.status == 409
    assert client.populate([{"name": "two", "upstream": up.address, "listen": "127.0.0.1:0"}])[0]["name"] == "two"
    client.reset()
    client.delete_proxy("link")
    assert set(client.proxies()) == {"two"}


def test_client_reports_unreachable_server() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ProxyError, match="cannot reach Toxiproxy"):
        ToxiproxyClient(f"http://127.0.0.1:{port}", timeout=2).proxies()


def test_update_listen_moves_the_proxy(client: ToxiproxyClient, upstreams, clients) -> None:
    up = upstreams(echo)
    old = port_of(client.create_proxy("link", "127.0.0.1:0", up.address)["listen"])
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    new = probe.getsockname()[1]
    probe.close()
    assert client.update_proxy("link", listen=f"127.0.0.1:{new}")["listen"] == f"127.0.0.1:{new}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", old), timeout=2).close()
    s = socket.create_connection(("127.0.0.1", new), timeout=2)
    clients.append(s)
    s.sendall(b"m")
    assert recv_exact(s, 1) == b"m"
