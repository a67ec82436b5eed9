"""Toxics: the impairments a link proxy applies, one small class per Toxiproxy toxic type.

A toxic sees one direction of one connection as a stream of timestamped items. An item is
`(time, payload)`: `time` is when the payload should reach the far side (time.monotonic seconds),
`payload` is data (bytes) or an in-band marker (EOF, CLOSE). Each toxic maps one item to zero or
more items (`process`), so they chain like Toxiproxy's toxic pipeline, but as pure time
arithmetic: nothing sleeps here, the proxy's writer thread waits for each item's time. That is
what lets latency pipeline (a chunk's delivery = arrival + latency) instead of serialising sleeps.

Attributes and units are Toxiproxy's (https://github.com/Shopify/toxiproxy#toxics):
latency (latency, jitter: ms), bandwidth (rate: KB/s, 1 KB = 1000 bytes), slow_close (delay: ms),
timeout (timeout: ms, 0 = never close), reset_peer (timeout: ms), slicer (average_size,
size_variation: bytes, delay: µs), limit_data (bytes).
"""

from __future__ import annotations

import math
import random
import threading
from typing import Any, ClassVar, Optional, Union

from smolcluster.common.errors import ProxyError

STREAMS = ("upstream", "downstream")  # upstream = client -> server, downstream = server -> client

# In-band markers travel through the chain after the data they follow.
EOF = "eof"  # the sender half-closed: half-close the far side
CLOSE = "close"  # close the whole connection (FIN)
# Out-of-band action a toxic can schedule through ToxicState.deadline.
RESET = "reset"  # close the whole connection with RST

Payload = Union[bytes, str]
Item = tuple[float, Payload]


class ToxicState:
    """What one toxic remembers about one direction of one connection."""

    __slots__ = ("toxic", "active", "rng", "last", "count", "fired", "deadline")

    def __init__(self, toxic: "Toxic", rng: random.Random):
        self.toxic = toxic
        self.rng = rng
        self.active = True  # False when the toxicity roll said "leave this connection alone"
        self.last = 0.0  # latest delivery time handed out (keeps jittered data in order)
        self.count = 0  # bytes passed (limit_data)
        self.fired = False  # a one-shot action was already scheduled
        self.deadline: tuple[float, str] | None = None  # (time, CLOSE | RESET) timer, no data needed


class Toxic:
    """Base class: a named, typed toxic on one stream of one proxy, with validated attributes.

    Instances are immutable once made; an update builds a new instance (`updated`)."""

    type_name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, int]] = {}
    paces: ClassVar[bool] = False  # True when the toxic limits the send rate (see `reserve`)

    def __init__(self, name: str, stream: str, toxicity: float, attributes: dict[str, int]):
        self.name = name
        self.stream = stream
        self.toxicity = toxicity
        self.attributes = attributes

    # ------------------------------------------------------------------ validation and JSON

    @classmethod
    def parse_attributes(cls, raw: Any, base: dict[str, int] | None = None) -> dict[str, int]:
        """Validate `raw` (the JSON `attributes` object) over `base` (defaults, or the current values)."""
        attrs = dict(cls.defaults if base is None else base)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ProxyError(f"bad request body: attributes of a {cls.type_name} toxic must be an object", 400)
        for key, value in raw.items():
            if key not in cls.defaults:
                known = ", ".join(cls.defaults) or "none"
                raise ProxyError(f"bad request body: unknown attribute '{key}' for a {cls.type_name} toxic (known: {known})", 400)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
                raise ProxyError(f"bad request body: attribute '{key}' of a {cls.type_name} toxic must be an integer, got {value!r}", 400)
            if value < 0:
                raise ProxyError(f"bad request body: attribute '{key}' of a {cls.type_name} toxic must be >= 0, got {value}", 400)
            attrs[key] = int(value)
        cls.check(attrs)
        return attrs

    @classmethod
    def check(cls, attrs: dict[str, int]) -> None:
        """Cross-attribute checks; raise ProxyError(400)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "stream": self.stream, "toxicity": self.toxicity, "attributes": dict(self.attributes)}

    def updated(self, body: dict[str, Any]) -> "Toxic":
        """A copy with `attributes` merged over the current ones and `toxicity` replaced (Toxiproxy's update)."""
        attrs = self.parse_attributes(body.get("attributes"), self.attributes)
        toxicity = parse_toxicity(body.get("toxicity", self.toxicity))
        return type(self)(self.name, self.stream, toxicity, attrs)

    # ------------------------------------------------------------------ behaviour

    def attach(self, st: ToxicState, now: float) -> None:
        """Called when the toxic starts acting on a connection (connection opened, toxic added or updated)."""

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        return [(t, payload)]

    def reserve(self, nbytes: int, now: float) -> float:
        """Pacing toxics: book `nbytes` on the link and return when they have crossed it."""
        return now

    def piece_size(self) -> int:
        return 1 << 30

    def delay_s(self) -> float:
        """Longest delay this toxic adds to data (sizes the proxy's queue)."""
        return 0.0

    def rate(self) -> Optional[float]:
        """Link capacity in bytes/s if this toxic limits it."""
        return None


class Latency(Toxic):
    """Every item (data and close) arrives `latency` ± `jitter` ms later; order is kept."""

    type_name = "latency"
    defaults = {"latency": 0, "jitter": 0}

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        delay = self.attributes["latency"]
        jitter = self.attributes["jitter"]
        if jitter:
            delay += st.rng.uniform(-jitter, jitter)
        # TCP never reorders, so a jittered chunk cannot overtake the one before it.
        st.last = max(t + max(delay, 0.0) / 1000.0, st.last)
        return [(st.last, payload)]

    def delay_s(self) -> float:
        return (self.attributes["latency"] + self.attributes["jitter"]) / 1000.0


class _Wire:
    """The serialisation schedule of one link direction, shared by every connection on it."""

    # Idle time the link may "bank", like a token bucket's depth: keeps the long-run rate exact
    # when a writer thread wakes a little late, at the cost of a burst this long after idling.
    SLACK_S = 0.01

    def __init__(self, bytes_per_s: float):
        self.bytes_per_s = bytes_per_s
        self.next_free = 0.0
        self.lock = threading.Lock()

    def reserve(self, nbytes: int, now: float) -> float:
        with self.lock:
            start = max(self.next_free, now - self.SLACK_S)
            self.next_free = start + nbytes / self.bytes_per_s
            return self.next_free


class Bandwidth(Toxic):
    """Caps the link at `rate` KB/s (1 KB = 1000 bytes; 0 = unlimited).

    Deviation from Toxiproxy: there the rate applies to each connection separately. Here it is the
    capacity of the link, shared by ALL connections of the proxy in this direction, as on a wire
    (two concurrent transfers each get about half). One schedule (`_Wire`) lives on the toxic, so an
    update starts a fresh schedule."""

    type_name = "bandwidth"
    defaults = {"rate": 0}
    paces = True

    def __init__(self, name: str, stream: str, toxicity: float, attributes: dict[str, int]):
        super().__init__(name, stream, toxicity, attributes)
        rate = attributes["rate"] * 1000.0
        self._wire = _Wire(rate) if rate > 0 else None

    def reserve(self, nbytes: int, now: float) -> float:
        return self._wire.reserve(nbytes, now) if self._wire else now

    def rate(self) -> Optional[float]:
        return self._wire.bytes_per_s if self._wire else None

    def piece_size(self) -> int:
        # ~5 ms of link time per booking, so concurrent connections interleave finely.
        if self._wire is None:
            return 1 << 30
        return int(min(256 * 1024, max(1500, self._wire.bytes_per_s * 0.005)))


class SlowClose(Toxic):
    """The close (FIN) reaches the far side `delay` ms after it was sent."""

    type_name = "slow_close"
    defaults = {"delay": 0}

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        if isinstance(payload, str):
            return [(t + self.attributes["delay"] / 1000.0, payload)]
        return [(t, payload)]


class Timeout(Toxic):
    """Drops all data; closes the connection `timeout` ms after the toxic took effect (0 = never).

    Removing the toxic lets data flow again (what was dropped stays lost)."""

    type_name = "timeout"
    defaults = {"timeout": 0}

    def attach(self, st: ToxicState, now: float) -> None:
        ms = self.attributes["timeout"]
        st.deadline = (now + ms / 1000.0, CLOSE) if ms > 0 else None

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        return [] if isinstance(payload, bytes) else [(t, payload)]


class ResetPeer(Toxic):
    """On the first data, drops it and resets the connection (TCP RST) `timeout` ms later."""

    type_name = "reset_peer"
    defaults = {"timeout": 0}

    def attach(self, st: ToxicState, now: float) -> None:
        st.fired = False
        st.deadline = None

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        if isinstance(payload, str):
            return [(t, payload)]
        if not st.fired:
            st.fired = True
            st.deadline = (t + self.attributes["timeout"] / 1000.0, RESET)
        return []


class Slicer(Toxic):
    """Cuts data into pieces of about `average_size` ± `size_variation` bytes, `delay` µs apart."""

    type_name = "slicer"
    defaults = {"average_size": 0, "size_variation": 0, "delay": 0}

    @classmethod
    def check(cls, attrs: dict[str, int]) -> None:
        if attrs["average_size"] < 1:
            raise ProxyError("bad request body: slicer average_size must be at least 1 byte", 400)
        if attrs["size_variation"] >= attrs["average_size"] and attrs["size_variation"] > 0:
            raise ProxyError("bad request body: slicer size_variation must be smaller than average_size", 400)

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        if isinstance(payload, str):
            return [(t, payload)]
        avg, var, step = self.attributes["average_size"], self.attributes["size_variation"], self.attributes["delay"] / 1e6
        out: list[Item] = []
        view = memoryview(payload)
        pos = 0
        while pos < len(payload):
            size = avg + (st.rng.randint(-var, var) if var else 0)
            out.append((t + len(out) * step, bytes(view[pos : pos + max(size, 1)])))
            pos += max(size, 1)
        return out


class LimitData(Toxic):
    """Passes `bytes` bytes of this direction, then closes the connection."""

    type_name = "limit_data"
    defaults = {"bytes": 0}

    def process(self, t: float, payload: Payload, st: ToxicState) -> list[Item]:
        if isinstance(payload, str):
            return [(t, payload)]
        if st.fired:
            return []
        remaining = self.attributes["bytes"] - st.count
        out: list[Item] = []
        if remaining > 0:
            part = payload[:remaining]
            st.count += len(part)
            out.append((t, part))
        if st.count >= self.attributes["bytes"]:
            st.fired = True
            out.append((t, CLOSE))
        return out


TOXIC_TYPES: dict[str, type[Toxic]] = {cls.type_name: cls for cls in (Latency, Bandwidth, SlowClose, Timeout, ResetPeer, Slicer, LimitData)}


def parse_toxicity(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ProxyError(f"bad request body: toxicity must be a number from 0 to 1, got {value!r}", 400)
    return float(value)


def toxic_from_json(body: Any) -> Toxic:
    """Build a toxic from a Toxiproxy create-toxic body; defaults: stream downstream, toxicity 1,
    name "<type>_<stream>". Raises ProxyError(400) with the reason."""
    if not isinstance(body, dict):
        raise ProxyError("bad request body: expected a JSON object with type, stream, toxicity, attributes", 400)
    stream = body.get("stream") or "downstream"
    if not isinstance(stream, str) or stream.lower() not in STREAMS:
        raise ProxyError("stream was invalid, can be either upstream or downstream", 400)
    stream = stream.lower()
    type_name = body.get("type")
    cls = TOXIC_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProxyError(f"invalid toxic type: {type_name!r} (known: {', '.join(TOXIC_TYPES)})", 400)
    name = body.get("name") or f"{type_name}_{stream}"
    if not isinstance(name, str):
        raise ProxyError("bad request body: toxic name must be a string", 400)
    toxicity = parse_toxicity(body.get("toxicity", 1.0))
    return cls(name, stream, toxicity, cls.parse_attributes(body.get("attributes")))
