"""A small Toxiproxy HTTP client (urllib only) used by the sim backends and fault injection.

It talks to the embedded server (api.ToxiproxyServer) or to a real Toxiproxy at `--toxiproxy URL`
alike: only the documented HTTP API is used. Results are the plain JSON objects the API returns.
Failures raise ProxyError with the server's status (404 unknown, 409 exists, 400 bad toxic).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Optional
from urllib.parse import quote

from smolcluster.common.errors import ProxyError


class ToxiproxyClient:
    def __init__(self, api_url: str = "http://127.0.0.1:8474", timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        # No environment HTTP proxy: the API is local or on a network we chose, never via a forwarder.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace").strip() or e.reason
            raise ProxyError(f"Toxiproxy at {self.api_url}: {method} {path}: {message}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ProxyError(f"cannot reach Toxiproxy at {self.api_url}: {reason} (is the server running?)", 503) from None
        return json.loads(raw) if raw.strip() else None

    # ------------------------------------------------------------------ server

    def version(self) -> str:
        out = self._call("GET", "/version")
        return out.get("version", "") if isinstance(out, dict) else str(out)

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._call("POST", "/reset")

    def populate(self, proxies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._call("POST", "/populate", proxies)["proxies"]

    # ------------------------------------------------------------------ proxies

    def proxies(self) -> dict[str, dict[str, Any]]:
        return self._call("GET", "/proxies")

    def get_proxy(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/proxies/{quote(name, safe='')}")

    def create_proxy(self, name: str, listen: str, upstream: str, enabled: bool = True) -> dict[str, Any]:
        """Returns the proxy JSON; its `listen` has the real port when asked for port 0."""
        return self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled})

    def update_proxy(self, name: str, *, listen: Optional[str] = None, upstream: Optional[str] = None, enabled: Optional[bool] = None) -> dict[str, Any]:
        body = {k: v for k, v in (("listen", listen), ("upstream", upstream), ("enabled", enabled)) if v is not None}
        return self._call("POST", f"/proxies/{quote(name, safe='')}", body)

    def enable(self, name: str) -> dict[str, Any]:
        return self.update_proxy(name, enabled=True)

    def disable(self, name: str) -> dict[str, Any]:
        """Cut the link: close its connections and refuse new ones until enabled."""
        return self.update_proxy(name, enabled=False)

    def delete_proxy(self, name: str) -> None:
        self._call("DELETE", f"/proxies/{quote(name, safe='')}")

    # ------------------------------------------------------------------ toxics

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/proxies/{quote(proxy, safe='')}/toxics")

    def get_toxic(self, proxy: str, name: str) -> dict[str, Any]:
        return self._call("GET", f"/proxies/{quote(proxy, safe='')}/toxics/{quote(name, safe='')}")

    def add_toxic(
        self,
        proxy: str,
        type: str,
        attributes: Optional[dict[str, int]] = None,
        *,
        stream: str = "downstream",
        name: Optional[str] = None,
        toxicity: float = 1.0,
    ) -> dict[str, Any]:
        """Add a toxic; its name defaults to "<type>_<stream>"."""
        body = {"name": name or f"{type}_{stream}", "type": type, "stream": stream, "toxicity": toxicity, "attributes": attributes or {}}
        return self._call("POST", f"/proxies/{quote(proxy, safe='')}/toxics", body)

    def update_toxic(self, proxy: str, name: str, attributes: Optional[dict[str, int]] = None, *, toxicity: Optional[float] = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if attributes is not None:
            body["attributes"] = attributes
        if toxicity is not None:
            body["toxicity"] = toxicity
        return self._call("POST", f"/proxies/{quote(proxy, safe='')}/toxics/{quote(name, safe='')}", body)

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{quote(proxy, safe='')}/toxics/{quote(name, safe='')}")
