"""Agentless shipping of a node's log and metrics lines to Loki's HTTP push API (stdlib only).

A Raspberry Pi in the cluster should not need an agent (Promtail is end-of-life; Alloy would be
one more service to install and keep running on every node), so every node can push its own lines:

    pusher = LokiPusher("http://10.10.0.1:3100", telemetry.node_labels(role="worker", hostname="mini2",
                        rank=1, algorithm="edp", run="hybrid-edp-20261201"), logger=log)
    fmt = FormatOnce(LogfmtFormatter(...))               # shared by the file handler: formats once
    log.addHandler(LokiLogHandler(pusher, fmt))         # log lines   -> kind=log, level=<record level>
    push_metrics_line(pusher, line)                      # metrics.jsonl lines -> kind=metrics, level=INFO
    ...
    pusher.close(timeout=5)

Training must never wait for Loki or fail because of it: push() only appends to a bounded queue
(the oldest line is dropped, and counted, when it is full) and returns; a daemon thread batches the
lines by count and age and POSTs them, retrying 429/5xx/connection errors with capped exponential
backoff and jitter. Nothing here raises out of push() or emit().
"""

from __future__ import annotations

import base64
import collections
import gzip as gzip_module
import http.client
import json
import logging
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

PUSH_PATH = "/loki/api/v1/push"

# The only stream labels the dashboards and queries rely on (see logging/README.md). Everything
# else a line carries stays in the line, where LogQL's logfmt/json parsers find it.
CONTRACT_LABELS = ("job", "component", "host", "rank", "level", "algorithm", "run", "kind")
KINDS = ("log", "metrics", "faults")

# Loki rejects lines over 256 KB by default (limits_config.max_line_size); a longer line would get
# its whole batch refused with a 400, so it is cut here instead.
MAX_LINE_CHARS = 200_000

_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def push_url(url: str) -> str:
    """`http://host:3100`, `http://host:3100/` or the full push URL -> the full push URL."""
    base = url.strip().rstrip("/")
    return base if base.endswith(PUSH_PATH) else base + PUSH_PATH


class LokiPusher:
    """Batches lines per label set and ships them to Loki from a daemon thread.

    labels: the node's stream labels; push(labels=...) adds to or overrides them per line.
    batch_lines / batch_wait_s: a batch goes out when it has batch_lines lines, or batch_wait_s
        after the sender started collecting it, whichever comes first.
    max_queue: lines held while Loki is slow or away; beyond it the oldest are dropped (counted).
    max_retries: further attempts for a batch after a 429, a 5xx or a connection error before it is
        dropped (counted in failed_batches and dropped_lines). Other 4xx are not retried.
    headers: extra request headers, e.g. {"X-Scope-OrgID": "tenant"} for a multi-tenant Loki.
        Credentials in the URL (http://user:token@host) are sent as HTTP basic auth.
    logger: the node's logger; it hears once when shipping degrades and once when it recovers.

    Connections go straight to Loki: proxy environment variables are ignored, because a cluster's
    Loki sits on the cluster's own network.
    """

    def __init__(self, url: str, labels: Mapping[str, Any], *, batch_lines: int = 1000,
                 batch_wait_s: float = 1.0, max_queue: int = 10_000, timeout_s: float = 5.0,
                 gzip: bool = True, logger: logging.Logger | None = None, max_retries: int = 5,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 headers: Mapping[str, str] | None = None):
        if batch_lines < 1 or max_queue < 1:
            raise ValueError("batch_lines and max_queue must be at least 1")
        self._url, auth = _split_credentials(push_url(url))  # self._url is safe to print
        self._base = {str(k): str(v) for k, v in labels.items()}
        bad = [k for k in self._base if not _LABEL_NAME.match(k)]
        if bad:
            raise ValueError(f"invalid Loki label name(s) {bad}: use letters, digits and _, not starting with a digit")
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        if auth:
            self._headers["Authorization"] = auth
        self._gzip = gzip
        self._batch_lines = batch_lines
        self._batch_wait_s = batch_wait_s
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._log = logger or logging.getLogger("smolcluster.lokipush")
        self._rng = random.Random()
        # An opener without proxy handling (see the class docstring).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        # Shared with push(): the queue of (ts_ns, label key, line) and the counters.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[int, tuple, str]] = collections.deque()
        self._keys: dict[tuple, tuple | None] = {}  # per-push labels -> merged, sorted label key
        self._closing = False
        self._deadline = float("inf")
        self._sent = self._dropped = self._failed = 0
        self._in_flight = 0  # lines of the batch the sender holds
        self._abandoned = False  # close() gave up waiting for that batch and counted it dropped

        # Only the sender thread touches these.
        self._last_ts: dict[tuple, int] = {}
        self._degraded = False
        self._stop_sleeping = threading.Event()

        self._thread = threading.Thread(target=self._run, name="smolcluster-lokipush", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side

    @property
    def url(self) -> str:
        """The push URL without credentials (safe to print)."""
        return self._url

    def push(self, line: str, *, ts_ns: int | None = None, labels: Mapping[str, Any] | None = None) -> None:
        """Queue one line. Never blocks on the network and never raises."""
        try:
            if ts_ns is None:
                ts_ns = time.time_ns()
            key = self._label_key(labels)
            if not isinstance(line, str):
                line = str(line)
            if len(line) > MAX_LINE_CHARS:
                line = line[:MAX_LINE_CHARS]
            with self._lock:
                if key is None or self._closing:
                    self._dropped += 1
                    return
                if len(self._queue) >= self._max_queue:
                    self._queue.popleft()
                    self._dropped += 1
                self._queue.append((int(ts_ns), key, line))
                n = len(self._queue)
                if n == 1 or n == self._batch_lines:  # start the batch clock / batch is full
                    self._wakeup.notify()
        except Exception:  # noqa: BLE001 - shipping logs must never break the caller
            pass

    def _label_key(self, labels: Mapping[str, Any] | None) -> tuple | None:
        """The stream's label set as a hashable, sorted tuple; None when a label name is invalid.

        Memoised on the per-push labels: a node uses a handful of label sets (one per level and kind)."""
        extra = tuple(labels.items()) if labels else ()
        key = self._keys.get(extra, False)
        if key is False:
            merged = dict(self._base)
            merged.update((str(k), str(v)) for k, v in extra)
            valid = all(_LABEL_NAME.match(k) for k in merged)
            key = tuple(sorted(merged.items())) if valid else None
            if len(self._keys) < 1000:  # bound the memo if a caller invents label values per line
                self._keys[extra] = key
        return key

    def stats(self) -> dict[str, int]:
        """sent_lines, dropped_lines, failed_batches, queued.

        While a batch is in flight its lines are in none of them; after close() every pushed line
        is in sent_lines or dropped_lines."""
        with self._lock:
            return {"sent_lines": self._sent, "dropped_lines": self._dropped,
                    "failed_batches": self._failed, "queued": len(self._queue)}

    def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within `timeout` seconds, then stop; what is left is dropped (counted).

        Safe to call twice. With Loki away, close gives up after one failed attempt instead of
        backing off: the node is shutting down."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + max(0.0, timeout)
            self._wakeup.notify_all()
        self._stop_sleeping.set()
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        with self._lock:
            self._dropped += len(self._queue)
            self._queue.clear()
            if self._thread.is_alive() and self._in_flight and not self._abandoned:
                # The sender is stuck in a request (a hanging Loki): count its batch as lost now, so
                # that after close() every pushed line is either sent or dropped.
                self._abandoned = True
                self._dropped += self._in_flight

    def __enter__(self) -> "LokiPusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._ship(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must not end shipping for the run
                self._count_failed(len(batch))
                self._set_degraded(f"internal error {type(e).__name__}: {e}")

    def _next_batch(self) -> list[tuple[int, tuple, str]] | None:
        """Wait for a full batch, or for the first queued line to age batch_wait_s, or for close."""
        with self._lock:
            while not self._queue and not self._closing:
                self._wakeup.wait()
            batch_due = time.monotonic() + self._batch_wait_s
            while len(self._queue) < self._batch_lines and not self._closing:
                left = batch_due - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.wait(left)
            if not self._queue or (self._closing and time.monotonic() >= self._deadline):
                return None
            n = min(self._batch_lines, len(self._queue))
            self._in_flight = n
            return [self._queue.popleft() for _ in range(n)]

    def _ship(self, batch: list[tuple[int, tuple, str]]) -> None:
        body = self._encode(batch)
        attempt = 0
        while True:
            retry_after, problem = self._post(body)
            with self._lock:
                if self._abandoned:  # close() already counted this batch
                    return
                if problem is None:
                    self._sent += len(batch)
                    self._in_flight = 0
            if problem is None:
                self._set_recovered()
                return
            self._set_degraded(problem)
            closing = self._closing
            if retry_after is None or attempt >= self._max_retries or closing:
                if closing and retry_after is not None:
                    self._give_up_on_close()  # Loki is away and the node is stopping
                self._count_failed(len(batch))
                return
            delay = min(self._max_backoff_s, self._backoff_s * 2 ** attempt)
            delay = self._rng.uniform(delay / 2, delay)  # jitter: nodes that failed together retry apart
            if retry_after > 0:
                delay = max(delay, min(retry_after, self._max_backoff_s))
            self._stop_sleeping.wait(delay)  # close() cuts the wait short
            attempt += 1

    def _encode(self, batch: list[tuple[int, tuple, str]]) -> bytes:
        """The push body: one stream per label set, timestamps strictly increasing within each.

        Two lines of a stream with the same (or an earlier) nanosecond would make Loki drop one as a
        duplicate or reorder them, so a repeat is nudged 1 ns past its predecessor."""
        streams: dict[tuple, list[list[str]]] = {}
        last = self._last_ts
        for ts, key, line in batch:
            prev = last.get(key)
            if prev is not None and ts <= prev:
                ts = prev + 1
            last[key] = ts
            streams.setdefault(key, []).append([str(ts), line])
        payload = {"streams": [{"stream": dict(key), "values": values} for key, values in streams.items()]}
        # "replace": a lone surrogate in a line must cost that character, not the batch.
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
        # Level 1: logs still shrink several-fold, at a fraction of the CPU a Pi would spend on level 9.
        return gzip_module.compress(body, compresslevel=1) if self._gzip else body

    def _post(self, body: bytes) -> tuple[float | None, str | None]:
        """One POST. Returns (retry_after, problem): problem None on success; retry_after None when
        the failure is not worth retrying, else the server's Retry-After in seconds (0 if none)."""
        timeout = self._timeout_s
        if self._closing:
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                response.read()
            return None, None
        except urllib.error.HTTPError as e:
            detail = _short(e.read(300).decode("utf-8", "replace")) if e.fp else ""
            problem = f"HTTP {e.code}" + (f": {detail}" if detail else "")
            if e.code == 429 or e.code >= 500:
                return _retry_after_seconds(e.headers.get("Retry-After")), problem
            return None, problem
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout, garbage
            reason = getattr(e, "reason", e)
            return 0.0, f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__

    def _count_failed(self, n: int) -> None:
        with self._lock:
            if not self._abandoned:
                self._failed += 1
                self._dropped += n
            self._in_flight = 0

    def _give_up_on_close(self) -> None:
        with self._lock:
            self._dropped += len(self._queue)
            self._queue.clear()

    def _set_degraded(self, problem: str) -> None:
        if not self._degraded:
            self._degraded = True
            self._log.warning(f"log shipping to Loki at {self._url} is degraded ({problem}); "
                              f"lines wait in a queue of {self._max_queue} and the oldest are dropped "
                              "while this lasts; training is not affected")

    def _set_recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            dropped = self.stats()["dropped_lines"]
            self._log.info(f"log shipping to Loki at {self._url} recovered "
                           f"({dropped} lines dropped so far)")


class FormatOnce(logging.Formatter):
    """Wraps a formatter so that the handlers of one record (log file, stderr, Loki) format it once.

    Give the same FormatOnce to each of them; the first formats, the others reuse the text. Saves
    the second formatting on every log call of a node that ships its log."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner
        self._attr = f"_smolcluster_line_{id(self)}"

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get(self._attr)
        if line is None:
            line = self.inner.format(record)
            record.__dict__[self._attr] = line
        return line


class LokiLogHandler(logging.Handler):
    """A logging handler that pushes each formatted record with level=<RECORD LEVEL> and kind=log.

    Give it the formatter the node's log file uses, so Loki holds the same lines as the file
    (wrapped in FormatOnce and shared, each record is formatted once for both)."""

    def __init__(self, pusher: LokiPusher, formatter: logging.Formatter | None = None,
                 level: int = logging.NOTSET):
        super().__init__(level)
        self.pusher = pusher
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pusher.push(self.format(record), ts_ns=_seconds_to_ns(record.created),
                             labels={"level": record.levelname.upper(), "kind": "log"})
        except Exception:  # noqa: BLE001 - never let logging to Loki raise into the caller
            pass


def push_metrics_line(pusher: LokiPusher, line: str | Mapping[str, Any], *, ts_ns: int | None = None) -> None:
    """Push one metrics line (the JSON text written to metrics.jsonl, or the dict) with kind=metrics.

    The entry's timestamp is the record's "time" (unix seconds) when there is one, so Loki's time
    axis matches the file's. Never raises."""
    try:
        if isinstance(line, str):  # the usual case first: isinstance against an ABC is slower
            text = line.rstrip("\n")
            when = _leading_time(text)
        else:
            text = json.dumps(line, separators=(",", ":"), default=str)
            when = line.get("time")
        if ts_ns is None and isinstance(when, (int, float)):
            ts_ns = _seconds_to_ns(when)
        pusher.push(text, ts_ns=ts_ns, labels={"level": "INFO", "kind": "metrics"})
    except Exception:  # noqa: BLE001
        pass


def push_fault_line(pusher: LokiPusher, line: str) -> None:
    """Push one faults.jsonl line (kind=faults, level=INFO) at the time it records. Never raises."""
    try:
        when = _leading_time(line)
        pusher.push(line, ts_ns=_seconds_to_ns(when) if isinstance(when, (int, float)) else None,
                    labels={"level": "INFO", "kind": "faults"})
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------- helpers


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user:password, a basic-auth header value or None)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Loki URL must be http(s)://host[:port][/loki/api/v1/push], got {url!r}")
    if parts.username is None:
        return url, None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return clean, f"Basic {token}"


def _seconds_to_ns(seconds: float) -> int:
    # Via microseconds: unix time in ns (~1.8e18) is beyond a float's exact integers, in us it is not.
    return round(seconds * 1_000_000) * 1000


def _leading_time(text: str) -> float | None:
    """The "time" of a line that starts {"time":<unix s>,... (as MetricsWriter writes them), without
    parsing the whole JSON on the training thread."""
    if not text.startswith('{"time":'):
        return None
    end = text.find(",", 8)
    try:
        return float(text[8:end if end > 0 else len(text) - 1])
    except ValueError:
        return None


def _retry_after_seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing, the backoff covers it
        return 0.0


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
