"""Link emulation: an embedded impairing TCP proxy that speaks Shopify Toxiproxy's HTTP API.

- toxics.py  one class per toxic type (latency, bandwidth, slow_close, timeout, reset_peer, slicer, limit_data)
- proxy.py   one proxy = one link: listen -> upstream, toxics per direction, per-link byte counters
- api.py     ToxiproxyServer: the proxies plus the HTTP API (in-process or `smolcluster proxy`)
- client.py  ToxiproxyClient: urllib client for the embedded server or a real Toxiproxy
"""

from smolcluster.testbed.linkemu.api import ToxiproxyServer
from smolcluster.testbed.linkemu.client import ToxiproxyClient
from smolcluster.testbed.linkemu.proxy import Proxy

__all__ = ["Proxy", "ToxiproxyClient", "ToxiproxyServer"]
