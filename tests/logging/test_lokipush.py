"""LokiPusher against a real HTTP receiver (PushSink): what reaches Loki, in which shape, and that
training never waits for it - whether Loki answers, refuses, throttles, fails or hangs."""

from __future__ import annotations

import gzip
import json
import logging
import time

import pytest

from smolcluster.bench.logging import PushSink, refused_url
from smolcluster.core.training.lokipush import (
    CONTRACT_LABELS,
    LokiLogHandler,
    LokiPusher,
    push_metrics_line,
    push_url,
)
from smolcluster.core.training.telemetry import node_labels

NODE = node_labels(role="worker", hostname="mini2", rank=1, algorithm="edp", run="run-1")
LABELS = {k: str(v) for k, v in NODE.items()}  # as Loki holds them: strings


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, word: str) -> list[str]:
        return [r.getMessage() for r in self.records if word in r.getMessage()]


@pytest.fixture
def node_log() -> tuple[logging.Logger, ListHandler]:
    log = logging.Logger("test-node")  # unregistered: nothing leaks between tests
    handler = ListHandler()
    log.addHandler(handler)
    return log, handler


def fast(**kw):
    """Pusher settings that make a test take milliseconds, not seconds."""
    return {"batch_wait_s": 0.05, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0} | kw


def test_node_labels_follow_the_contract() -> None:
    # smolcluster rank 1 is the original's worker 0 (worker-rank0-mini2)
    assert LABELS == {"job": "smolcluster-worker", "component": "worker", "host": "worker-rank0-mini2",
                      "rank": "0", "algorithm": "edp", "run": "run-1"}
    assert set(LABELS) | {"level", "kind"} == set(CONTRACT_LABELS)


@pytest.mark.parametrize("given", ["http://h:3100", "http://h:3100/", "http://h:3100/loki/api/v1/push"])
def test_url_with_or_without_push_path(given: str) -> None:
    assert push_url(given) == "http://h:3100/loki/api/v1/push"


def test_body_is_gzipped_json_with_exact_labels_and_increasing_ns_timestamps() -> None:
    with PushSink() as sink:
        pusher = LokiPusher(sink.url + "/", LABELS, **fast())
        # equal and backwards timestamps within one stream; another stream interleaved
        for ts in (1000, 1000, 999, 5000):
            pusher.push(f"log {ts}", ts_ns=ts, labels={"level": "INFO", "kind": "log"})
            pusher.push(f"err {ts}", ts_ns=ts, labels={"level": "ERROR", "kind": "log"})
        pusher.close(timeout=5)
        assert pusher.stats() == {"sent_lines": 8, "dropped_lines": 0, "failed_batches": 0, "queued": 0}

    (req,) = sink.requests
    assert req.path == "/loki/api/v1/push"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Content-Encoding"] == "gzip"
    payload = json.loads(gzip.decompress(req.body))  # decode it ourselves, not only the sink
    streams = {s["stream"]["level"]: s for s in payload["streams"]}
    assert set(streams) == {"INFO", "ERROR"}
    for level, stream in streams.items():
        assert stream["stream"] == {**LABELS, "level": level, "kind": "log"}
        stamps = [ts for ts, _ in stream["values"]]
        assert all(isinstance(ts, str) and ts.isdigit() for ts in stamps)
        assert [int(t) for t in stamps] == [1000, 1001, 1002, 5000]  # nudged by 1 ns, order kept
        assert [line for _, line in stream["values"]][0].endswith("1000")


def test_plain_json_when_gzip_is_off() -> None:
    with PushSink() as sink:
        pusher = LokiPusher(sink.url, LABELS, gzip=False, **fast())
        pusher.push("hello")
        pusher.close(timeout=5)
    (req,) = sink.requests
    assert "Content-Encoding" not in req.headers
    assert json.loads(req.body)["streams"][0]["values"][0][1] == "hello"


def test_lines_are_batched_into_few_requests() -> None:
    with PushSink() as sink:
        pusher = LokiPusher(sink.url, LABELS, batch_lines=250, batch_wait_s=5.0)
        for i in range(1000):
            pusher.push(f"line {i}")
        pusher.close(timeout=5)
    assert 4 <= len(sink.requests) <= 8
    assert [line for _, _, line in sink.lines()] == [f"line {i}" for i in range(1000)]


def test_429_and_500_are_retried_then_delivered_once() -> None:
    with PushSink(responses=(429, 500, 204)) as sink:
        pusher = LokiPusher(sink.url, LABELS, **fast())
        pusher.push("survives")
        assert sink.wait_for_requests(3)
        pusher.close(timeout=5)
    assert [r.status for r in sink.requests] == [429, 500, 204]
    assert [line for _, _, line in sink.lines()] == ["survives"]
    assert pusher.stats() == {"sent_lines": 1, "dropped_lines": 0, "failed_batches": 0, "queued": 0}


def test_retries_are_bounded_then_the_batch_is_dropped_and_counted() -> None:
    with PushSink(responses=(500,)) as sink:
        pusher = LokiPusher(sink.url, LABELS, **fast(max_retries=2))
        for i in range(7):
            pusher.push(f"line {i}")
        assert sink.wait_for_requests(3)
        time.sleep(0.2)
        assert len(sink.requests) == 3  # first attempt + 2 retries, then no more
        pusher.close(timeout=1)
    assert pusher.stats() == {"sent_lines": 0, "dropped_lines": 7, "failed_batches": 1, "queued": 0}


def test_400_is_not_retried_dropped_and_counted() -> None:
    with PushSink(responses=(400, 204)) as sink:
        pusher = LokiPusher(sink.url, LABELS, **fast())
        for i in range(5):
            pusher.push(f"bad {i}")
        assert sink.wait_for_requests(1)
        time.sleep(0.2)  # a retry would have happened by now
        pusher.push("good")
        pusher.close(timeout=5)
    assert [r.status for r in sink.requests] == [400, 204]
    assert [line for _, _, line in sink.lines()] == ["good"]
    assert pusher.stats() == {"sent_lines": 1, "dropped_lines": 5, "failed_batches": 1, "queued": 0}


def test_push_returns_at_once_while_loki_hangs() -> None:
    hang_s = 4.0
    with PushSink(responses=(None,)) as sink:
        pusher = LokiPusher(sink.url, LABELS, batch_lines=100, batch_wait_s=0.01, timeout_s=hang_s)
        pusher.push("first")
        assert sink.wait_for_requests(1)  # the sender is now stuck in a request that gets no answer
        t0 = time.perf_counter()
        for i in range(10_000):
            pusher.push(f"line {i}")
        pushing = time.perf_counter() - t0
        pusher.close(timeout=0.2)
    # 10k pushes take milliseconds; a push waiting on the network would take at least the hang.
    assert pushing < hang_s / 10, pushing


def test_queue_bound_keeps_the_newest_and_counts_drops_exactly() -> None:
    with PushSink() as sink:
        # the sender waits for 10k lines or 60 s: nothing leaves the queue until close()
        pusher = LokiPusher(sink.url, LABELS, batch_lines=10_000, batch_wait_s=60, max_queue=100)
        for i in range(1000):
            pusher.push(f"line {i}")
        assert pusher.stats() == {"sent_lines": 0, "dropped_lines": 900, "failed_batches": 0, "queued": 100}
        pusher.close(timeout=5)
    assert [line for _, _, line in sink.lines()] == [f"line {i}" for i in range(900, 1000)]
    assert pusher.stats() == {"sent_lines": 100, "dropped_lines": 900, "failed_batches": 0, "queued": 0}


def test_degraded_is_logged_once_and_recovery_once(node_log) -> None:
    log, seen = node_log
    with PushSink(responses=(500,)) as sink:
        pusher = LokiPusher(sink.url, LABELS, logger=log, **fast(max_retries=1))
        for batch in range(4):
            pusher.push(f"lost {batch}")
            assert sink.wait_for_requests(2 * (batch + 1))
            time.sleep(0.1)
        assert pusher.stats()["failed_batches"] == 4
        sink.set_responses((204,))
        pusher.push("back")
        deadline = time.monotonic() + 5
        while pusher.stats()["sent_lines"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        pusher.close(timeout=5)
    assert len(seen.messages("degraded")) == 1
    assert seen.records[0].levelno == logging.WARNING
    assert len(seen.messages("recovered")) == 1
    assert "4 lines dropped" in seen.messages("recovered")[0]


def test_close_is_bounded_when_loki_hangs() -> None:
    with PushSink(responses=(None,)) as sink:
        pusher = LokiPusher(sink.url, LABELS, batch_wait_s=0.01, timeout_s=30)
        for i in range(50):
            pusher.push(f"line {i}")
        assert sink.wait_for_requests(1)
        t0 = time.perf_counter()
        pusher.close(timeout=0.5)
        took = time.perf_counter() - t0
    assert took < 1.5, took
    stats = pusher.stats()
    assert stats["sent_lines"] == 0 and stats["dropped_lines"] == 50 and stats["queued"] == 0


def test_close_is_quick_and_counts_everything_when_loki_is_down() -> None:
    pusher = LokiPusher(refused_url(), LABELS, batch_lines=10, batch_wait_s=60, backoff_s=5.0)
    for i in range(95):
        pusher.push(f"line {i}")
    t0 = time.perf_counter()
    pusher.close(timeout=5)
    assert time.perf_counter() - t0 < 2.0  # one refused attempt, no 5 s backoff
    stats = pusher.stats()
    assert stats["sent_lines"] == 0 and stats["dropped_lines"] == 95 and stats["queued"] == 0


def test_push_never_raises() -> None:
    pusher = LokiPusher(refused_url(), LABELS, batch_wait_s=60)
    pusher.push(None)  # type: ignore[arg-type]
    pusher.push("x", ts_ns="not a number")  # type: ignore[arg-type]
    pusher.push("x", labels={"bad-name": "v"})  # an invalid label set drops that line, counted
    pusher.push("x", labels={"ok": ["unhashable"]})  # type: ignore[dict-item]
    pusher.close(timeout=0.5)
    pusher.push("after close")
    assert pusher.stats()["dropped_lines"] >= 2
    with pytest.raises(ValueError):
        LokiPusher("ftp://nowhere", LABELS)
    with pytest.raises(ValueError):
        LokiPusher("http://h:3100", {"bad-name": "v"})


def test_log_handler_pushes_records_with_upper_case_level_and_kind_log() -> None:
    with PushSink() as sink:
        pusher = LokiPusher(sink.url, LABELS, **fast())
        log = logging.Logger("node")
        log.addHandler(LokiLogHandler(pusher, logging.Formatter("level=%(levelname)s msg=%(message)s")))
        log.info("hello")
        log.warning("careful")
        log.error("broken")
        log.critical("fatal")
        log.info("%d", "not a number")  # a record that cannot be formatted must not raise
        pusher.close(timeout=5)
    got = [(labels["level"], labels["kind"], line) for labels, _, line in sink.lines()]
    assert got == [("INFO", "log", "level=INFO msg=hello"), ("WARNING", "log", "level=WARNING msg=careful"),
                   ("ERROR", "log", "level=ERROR msg=broken"), ("CRITICAL", "log", "level=CRITICAL msg=fatal")]


def test_metrics_lines_get_kind_metrics_level_info_and_their_own_time() -> None:
    line = '{"time":1796146068.5,"event":"step","step":5,"loss":1.89}'
    with PushSink() as sink:
        pusher = LokiPusher(sink.url, LABELS, **fast())
        push_metrics_line(pusher, line + "\n")
        push_metrics_line(pusher, {"time": 1796146069.25, "event": "eval", "test_accuracy": 0.91})
        pusher.close(timeout=5)
    (first, second) = sink.lines()
    assert first[0] == {**LABELS, "level": "INFO", "kind": "metrics"}
    assert first[2] == line and int(first[1]) == 1796146068_500000000
    assert json.loads(second[2])["test_accuracy"] == 0.91 and int(second[1]) == 1796146069_250000000


def test_basic_auth_from_url_credentials_never_in_messages(node_log) -> None:
    log, seen = node_log
    with PushSink(responses=(500,)) as sink:
        url = sink.url.replace("http://", "http://user:s3cret@")
        pusher = LokiPusher(url, LABELS, logger=log, **fast(max_retries=0))
        pusher.push("x")
        assert sink.wait_for_requests(1)
        pusher.close(timeout=1)
    assert sink.requests[0].headers["Authorization"].startswith("Basic ")
    assert seen.messages("degraded") and not any("s3cret" in m for m in seen.messages(""))
