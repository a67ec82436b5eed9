"""The embedded Toxiproxy: a set of proxies behind Shopify Toxiproxy's HTTP API.

The HTTP API is the contract (https://github.com/Shopify/toxiproxy#http-api): same endpoints,
JSON shapes and status codes, so toxiproxy-python (or any Toxiproxy client) drives it unchanged
and a real Toxiproxy server can stand in. `ToxiproxyServer` is also usable in-process without HTTP.

    GET  /version                         {"version": ...}
    GET  /proxies                         {name: proxy}
    POST /proxies                         create -> 201 proxy | 400 | 409 exists | 500 cannot listen
    POST /populate                        [proxy, ...] create or replace -> 201 {"proxies": [...]}
    GET|POST|PATCH|DELETE /proxies/{p}    show | update (enabled: false cuts the link) | delete -> 204
    GET|POST /proxies/{p}/toxics          list | create -> 200 toxic (as Toxiproxy) | 400 | 409
    GET|POST|PATCH|DELETE /proxies/{p}/toxics/{t}
    POST /reset                           enable every proxy, remove every toxic -> 204
Errors are {"error": message, "status": code}.

Deviations: a proxy created without `listen` gets 127.0.0.1:0 (Toxiproxy: all interfaces); the
bandwidth rate is shared by all connections of a link (see toxics.Bandwidth); unknown toxic
attributes are a 400; proxy JSON carries an extra `stats` object (bytes per direction, connections).
"""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

from smolcluster.common.errors import ConfigError, ProxyError
from smolcluster.testbed.linkemu.proxy import Proxy, join_hostport, split_hostport
from smolcluster.testbed.linkemu.toxics import Toxic, toxic_from_json

API_VERSION = "2.12.0-smolcluster"  # the Toxiproxy API generation this server speaks
MAX_BODY = 1 << 20


class ToxiproxyServer:
    """Proxies by name, plus (after `start`) the Toxiproxy HTTP API on api_host:api_port."""

    def __init__(self, api_host: str = "127.0.0.1", api_port: int = 8474, seed: Optional[int] = None):
        self.api_host = api_host
        self.api_port = api_port
        self._seed = seed
        self._proxies: dict[str, Proxy] = {}
        self._lock = threading.RLock()
        self._http: Optional[ThreadingHTTPServer] = None
        self._http_thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def api_url(self) -> str:
        return f"http://{join_hostport(self.api_host, self.api_port)}"

    def start(self) -> None:
        """Serve the HTTP API (api_port 0 picks a free port; api_url reports it)."""
        if self._http is not None:
            return
        try:
            http = _HTTPServer((self.api_host, self.api_port), _Handler)
        except OSError as e:
            raise ProxyError(f"cannot serve the Toxiproxy API on {self.api_host}:{self.api_port}: {e.strerror or e}", 500) from None
        http.toxiproxy = self
        self.api_port = http.server_address[1]
        self._http = http
        self._http_thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.1}, name="linkemu-api", daemon=True)
        self._http_thread.start()

    def stop(self) -> None:
        """Stop the API and every proxy; closes all sockets and joins all threads."""
        http, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if http is not None:
            http.shutdown()
            http.server_close()  # joins the request threads (block_on_close)
        if thread is not None:
            thread.join()
        with self._lock:
            proxies = list(self._proxies.values())
            self._proxies.clear()
        for proxy in proxies:
            proxy.stop()

    def __enter__(self) -> "ToxiproxyServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ proxies

    def proxies(self) -> dict[str, Proxy]:
        with self._lock:
            return dict(self._proxies)

    def get_proxy(self, name: str) -> Proxy:
        with self._lock:
            proxy = self._proxies.get(name)
        if proxy is None:
            raise ProxyError(f"proxy not found: {name!r}", 404)
        return proxy

    def create_proxy(self, name: str, listen: str = "127.0.0.1:0", upstream: str = "", enabled: bool = True) -> Proxy:
        if not name:
            raise ProxyError("missing required field: name", 400)
        if not upstream:
            raise ProxyError("missing required field: upstream", 400)
        with self._lock:
            if name in self._proxies:
                raise ProxyError(f"proxy already exists: {name!r}", 409)
            seed = None if self._seed is None else self._seed * 1_000_003 + zlib.crc32(name.encode())
            proxy = Proxy(name, listen or "127.0.0.1:0", upstream, seed=seed)
            if enabled:
                proxy.start()
            self._proxies[name] = proxy
            return proxy

    def update_proxy(self, name: str, listen: Optional[str] = None, upstream: Optional[str] = None, enabled: Optional[bool] = None) -> Proxy:
        proxy = self.get_proxy(name)
        proxy.update(listen=listen, upstream=upstream, enabled=enabled)
        return proxy

    def delete_proxy(self, name: str) -> None:
        with self._lock:
            proxy = self.get_proxy(name)
            del self._proxies[name]
        proxy.stop()

    def populate(self, specs: list[dict[str, Any]]) -> list[Proxy]:
        """Create each proxy; an existing one with another listen or upstream is replaced, else kept."""
        out = []
        for spec in specs:
            name, listen, upstream, enabled = _proxy_fields(spec)
            with self._lock:
                existing = self._proxies.get(name)
                if existing is not None and (existing.upstream != upstream or (listen and existing.listen != listen)):
                    self.delete_proxy(name)
                    existing = None
                out.append(existing or self.create_proxy(name, listen or "127.0.0.1:0", upstream, enabled))
        return out

    def reset(self) -> None:
        """Enable every proxy and remove every toxic (Toxiproxy's POST /reset)."""
        for proxy in self.proxies().values():
            proxy.start()
            proxy.reset_toxics()

    # ------------------------------------------------------------------ toxics

    def add_toxic(self, proxy: str, body: dict[str, Any]) -> Toxic:
        return self.get_proxy(proxy).add_toxic(toxic_from_json(body))

    def update_toxic(self, proxy: str, toxic: str, body: dict[str, Any]) -> Toxic:
        if not isinstance(body, dict):
            raise ProxyError("bad request body: expected a JSON object", 400)
        return self.get_proxy(proxy).update_toxic(toxic, body)

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self.get_proxy(proxy).remove_toxic(toxic)


def _proxy_fields(spec: Any, current: Optional[Proxy] = None) -> tuple[str, str, str, bool]:
    """(name, listen, upstream, enabled) from a proxy JSON object, defaults from `current`."""
    if not isinstance(spec, dict):
        raise ProxyError("bad request body: expected a JSON object with name, listen, upstream, enabled", 400)
    name = spec.get("name", current.name if current else "")
    listen = spec.get("listen", current.listen if current else "")
    upstream = spec.get("upstream", current.upstream if current else "")
    enabled = spec.get("enabled", current.enabled if current else True)
    for key, value in (("name", name), ("listen", listen), ("upstream", upstream)):
        if not isinstance(value, str):
            raise ProxyError(f"bad request body: {key} must be a string", 400)
    if not isinstance(enabled, bool):
        raise ProxyError("bad request body: enabled must be true or false", 400)
    if not name:
        raise ProxyError("missing required field: name", 400)
    if not upstream:
        raise ProxyError("missing required field: upstream", 400)
    for value in (listen, upstream):
        if value:
            split_hostport(value)
    return name, listen, upstream, enabled


def load_proxy_config(path: str | Path) -> list[dict[str, Any]]:
    """Read a Toxiproxy -config file: a JSON list of {name, listen, upstream, enabled}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(path, "<file>", f"cannot read it: {e.strerror or e}", "pass an existing JSON file") from None
    except ValueError as e:
        raise ConfigError(path, "<file>", f"not valid JSON: {e}", "write a JSON list of proxies") from None
    if not isinstance(data, list):
        raise ConfigError(path, "<top level>", "must be a JSON list of proxies", 'e.g. [{"name": "a", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9000"}]')
    for i, spec in enumerate(data):
        try:
            _proxy_fields(spec)
        except ProxyError as e:
            raise ConfigError(path, f"[{i}]", str(e), "give name, upstream (HOST:PORT), optional listen and enabled") from None
    return data


# ---------------------------------------------------------------------------- HTTP layer


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    toxiproxy: ToxiproxyServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "smolcluster-linkemu"

    def log_message(self, format: str, *args: Any) -> None:  # keep test and CLI output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self.close_connection = True  # one request per connection: no idle threads left at stop
        if self.headers.get("User-Agent", "").startswith("Mozilla/"):
            # As Toxiproxy: a web page must not reconfigure the network through the user's browser.
            self._reply(403, {"error": "User agent not allowed", "status": 403})
            return
        parts = [unquote(p) for p in self.path.split("?", 1)[0].strip("/").split("/")]
        try:
            body = self._body() if method in ("POST", "PATCH") else None
            status, payload = self._route(method, parts, body)
        except ProxyError as e:
            status, payload = e.status, {"error": str(e), "status": e.status}
        self._reply(status, payload)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ProxyError("bad request body: too large", 400)
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ProxyError(f"bad request body: {e}", 400) from None

    def _route(self, method: str, parts: list[str], body: Any) -> tuple[int, Any]:
        srv = self.server.toxiproxy
        n = len(parts)
        if parts == ["version"] and method == "GET":
            return 200, {"version": API_VERSION}
        if parts == ["reset"] and method == "POST":
            srv.reset()
            return 204, None
        if parts == ["populate"] and method == "POST":
            if not isinstance(body, list):
                raise ProxyError("bad request body: expected a JSON list of proxies", 400)
            return 201, {"proxies": [p.to_json() for p in srv.populate(body)]}
        if parts == ["proxies"]:
            if method == "GET":
                return 200, {name: p.to_json() for name, p in srv.proxies().items()}
            if method == "POST":
                name, listen, upstream, enabled = _proxy_fields(body)
                return 201, srv.create_proxy(name, listen or "127.0.0.1:0", upstream, enabled).to_json()
        elif n == 2 and parts[0] == "proxies":
            name = parts[1]
            if method == "GET":
                return 200, srv.get_proxy(name).to_json()
            if method in ("POST", "PATCH"):
                proxy = srv.get_proxy(name)
                _, listen, upstream, enabled = _proxy_fields({**body, "name": name} if isinstance(body, dict) else body, proxy)
                return 200, srv.update_proxy(name, listen, upstream, enabled).to_json()
            if method == "DELETE":
                srv.delete_proxy(name)
                return 204, None
        elif n == 3 and parts[0] == "proxies" and parts[2] == "toxics":
            if method == "GET":
                return 200, [t.to_json() for t in srv.get_proxy(parts[1]).toxics()]
            if method == "POST":
                return 200, srv.add_toxic(parts[1], body).to_json()
        elif n == 4 and parts[0] == "proxies" and parts[2] == "toxics":
            if method == "GET":
                return 200, srv.get_proxy(parts[1]).get_toxic(parts[3]).to_json()
            if method in ("POST", "PATCH"):
                return 200, srv.update_toxic(parts[1], parts[3], body).to_json()
            if method == "DELETE":
                srv.remove_toxic(parts[1], parts[3])
                return 204, None
        else:
            return 404, {"error": f"no such endpoint: {self.path}", "status": 404}
        return 405, {"error": f"method {method} not allowed on {self.path}", "status": 405}

    def _reply(self, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if data:
            self.wfile.write(data)
