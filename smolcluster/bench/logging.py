"""`smolcluster bench logging`: what shipping logs to Loki costs a training loop.

One process trains SimpleNN 784-128-10 (Adam, batch 32, random MNIST-shaped data) and writes one
logfmt log line and one JSON metrics line per step to files, as a node does. The same loop runs
with shipping off and with a LokiPusher pointed at:

  live     a receiver that answers 204 (Loki's success), in its own process as Loki would be
  dead     a port nobody listens on (connection refused: Loki down)
  hanging  a receiver that accepts and never answers (Loki wedged, or a black-holed link)

Modes are interleaved in rounds and each is compared with the "off" run of its own round, so a
neighbour's load on the machine moves both sides of a ratio. The goal: every mode within 5 % of off.

PushSink, the receiver, also serves the tests in tests/logging.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

MODES = ("off", "live", "dead", "hanging")
GOAL_RATIO = 0.95


# --------------------------------------------------------------------------- a stand-in for Loki


@dataclass
class Received:
    """One push request as the sink saw it; `payload` is the decoded JSON (None if it was not JSON)."""

    path: str
    headers: dict[str, str]
    body: bytes
    payload: Any = None
    status: int = 0


@dataclass
class PushSink:
    """An HTTP server on 127.0.0.1 that plays Loki's push endpoint.

    responses: statuses to answer, in order; the last repeats (e.g. (429, 500, 204)). A status of
        None means hang: accept the request and never answer until the sink closes.
    record: keep every request (decompressed and parsed) in `requests`.
    """

    responses: Sequence[int | None] = (204,)
    record: bool = True
    bind: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._answered = 0
        self._closed = threading.Event()
        self._got_request = threading.Condition(self._lock)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = sink._next_status()
                if sink.record:
                    sink._keep(self.path, dict(self.headers), body, status)
                if status is None:
                    sink._closed.wait()  # hang: hold the connection, say nothing
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0" if status == 204 else "2")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                if status != 204:
                    self.wfile.write(b"no")

            def log_message(self, *args: Any) -> None:  # quiet: the tests read requests, not logs
                pass

        self._server = ThreadingHTTPServer((self.bind, self.port), Handler)
        self._server.daemon_threads = True
        # a short poll interval: close() (shutdown) waits for one poll
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="push-sink",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "") else self.bind
        return f"http://{host}:{self._server.server_address[1]}"

    def set_responses(self, responses: Sequence[int | None]) -> None:
        with self._lock:
            self.responses, self._answered = tuple(responses), 0

    def _next_status(self) -> int | None:
        with self._lock:
            i = min(self._answered, len(self.responses) - 1)
            self._answered += 1
            return self.responses[i]

    def _keep(self, path: str, headers: dict[str, str], body: bytes, status: int | None) -> None:
        payload = None
        try:
            raw = gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body
            payload = json.loads(raw)
        except (OSError, ValueError):
            pass
        with self._lock:
            self.requests.append(Received(path, headers, body, payload, status or 0))
            self._got_request.notify_all()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least n requests arrived (True) or the timeout passed (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._got_request.wait(left)
            return True

    def lines(self) -> list[tuple[dict[str, str], str, str]]:
        """Every (stream labels, ns timestamp, line) received in an answered-2xx request, in order."""
        with self._lock:
            reqs = list(self.requests)
        out = []
        for r in reqs:
            if r.payload is None or not 200 <= r.status < 300:
                continue
            for stream in r.payload["streams"]:
                out += [(stream["stream"], ts, line) for ts, line in stream["values"]]
        return out

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "PushSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def refused_url() -> str:
    """A loopback URL where nothing listens: pushes meet connection refused, as with Loki down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def serve(status: str) -> None:
    """Run a non-recording PushSink until stdin closes; print its URL first (the bench's subprocess)."""
    sink = PushSink(responses=(None if status == "hang" else int(status),), record=False)
    print(sink.url, flush=True)
    sys.stdin.read()
    sink.close()


class _SinkProcess:
    """PushSink in a child process, so the receiver's work does not share the trainer's interpreter."""

    def __init__(self, status: str):
        code = f"from smolcluster.bench.logging import serve; serve({status!r})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError("the push receiver process did not start")

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --------------------------------------------------------------------------- the measured loop


@dataclass
class ModeResult:
    mode: str
    steps_per_s: float  # wall clock, median over rounds
    ratio_vs_off: float  # median over rounds of (this mode / the same round's off), wall clock
    cpu_ratio_vs_off: float  # the same with steps per CPU second of the process (all threads)
    sent_lines: int  # summed over rounds
    dropped_lines: int
    failed_batches: int


def _batches(n: int, seed: int) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(n)]


def train_loop(steps: int, workdir: Path, url: str | None, *, seed: int = 0,
               pusher_kwargs: dict[str, Any] | None = None) -> tuple[float, float, dict[str, int]]:
    """Train `steps` steps logging a line and a metrics line per step.

    Returns (steps per wall second, steps per CPU second of this process - all its threads -, the
    pusher's stats). CPU seconds are what shipping adds to a node's work; wall seconds also move
    with whatever else the machine runs.

    With url None nothing is shipped (the files are still written: that is what a node does anyway)."""
    import torch

    from smolcluster.core.training.lokipush import FormatOnce, LokiLogHandler, LokiPusher, push_metrics_line
    from smolcluster.core.training.telemetry import node_labels
    from smolcluster.core.training.models import SimpleNN, loss_fn
    from smolcluster.core.training.telemetry import LogfmtFormatter

    torch.manual_seed(seed)
    model = SimpleNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = _batches(64, seed)
    labels = node_labels(role="worker", hostname="bench", rank=1, algorithm="edp", run="bench-logging")

    log = logging.Logger("smolcluster.bench.logging")  # not registered globally: no state left behind
    file_handler = logging.FileHandler(workdir / "worker.log", encoding="utf-8")
    fmt = FormatOnce(LogfmtFormatter({k: labels[k] for k in ("job", "component", "host", "rank")}))
    file_handler.setFormatter(fmt)
    log.addHandler(file_handler)
    pusher = None
    if url is not None:
        pusher = LokiPusher(url, labels, logger=log, **(pusher_kwargs or {}))
        log.addHandler(LokiLogHandler(pusher, fmt))
    metrics = open(workdir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")

    warmup = min(50, steps // 10)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(warmup + steps):
        if step == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        x, y = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        value = loss.item()
        log.info("step done", extra={"kv": {"step": step, "loss": round(value, 4)}})
        line = json.dumps({"time": time.time(), "event": "step", "step": step, "loss": value, "version": 0,
                           "status": "applied", "tau": 0, "samples": 32}, separators=(",", ":"))
        metrics.write(line + "\n")
        if pusher is not None:
            push_metrics_line(pusher, line)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0

    stats = {"sent_lines": 0, "dropped_lines": 0, "failed_batches": 0, "queued": 0}
    if pusher is not None:
        pusher.close(timeout=1.0)  # outside the timed part: a node pays this once, at exit
        stats = pusher.stats()
    metrics.close()
    file_handler.close()
    return steps / elapsed, steps / cpu, stats


def run(steps: int = 1000, rounds: int = 9, modes: Sequence[str] = MODES) -> list[ModeResult]:
    """Every round runs off and each other mode once, in a rotating order so that none always runs
    first or last; each mode's ratio is taken against the off run of its own round."""
    import torch

    torch.set_num_threads(1)  # one core per node process, as in the sim; also steadier figures
    modes = ["off"] + [m for m in modes if m != "off"]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    totals = {m: {"sent_lines": 0, "dropped_lines": 0, "failed_batches": 0} for m in modes}
    live, hang = _SinkProcess("204"), _SinkProcess("hang")
    urls = {"off": None, "live": live.url, "dead": refused_url(), "hanging": hang.url}
    try:
        with tempfile.TemporaryDirectory(prefix="smolcluster-bench-logging-") as tmp:
            for r in range(rounds):
                for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                    workdir = Path(tmp) / f"{m}-{r}"
                    workdir.mkdir()
                    per_wall_s, per_cpu_s, stats = train_loop(steps, workdir, urls[m], seed=r)
                    wall[m].append(per_wall_s)
                    cpu[m].append(per_cpu_s)
                    for k in totals[m]:
                        totals[m][k] += stats[k]
    finally:
        live.close()
        hang.close()

    def ratio(series: dict[str, list[float]], m: str) -> float:
        return statistics.median(a / b for a, b in zip(series[m], series["off"], strict=True))

    return [ModeResult(m, statistics.median(wall[m]), ratio(wall, m), ratio(cpu, m), **totals[m]) for m in modes]


def format_table(rows: list[ModeResult], steps: int, rounds: int) -> str:
    lines = [f"bench logging: SimpleNN 784-128-10, Adam, batch 32, 1 log + 1 metrics line per step; "
             f"{steps} steps x {rounds} rounds, medians",
             f"{'shipping':<10} {'steps/s':>8} {'vs off':>7} {'CPU vs off':>11} {'sent':>7} {'dropped':>8} "
             f"{'failed batches':>15}"]
    for r in rows:
        lines.append(f"{r.mode:<10} {r.steps_per_s:>8.0f} {r.ratio_vs_off:>7.3f} {r.cpu_ratio_vs_off:>11.3f} "
                     f"{r.sent_lines:>7} {r.dropped_lines:>8} {r.failed_batches:>15}")
    slow = [r.mode for r in rows if min(r.ratio_vs_off, r.cpu_ratio_vs_off) < GOAL_RATIO]
    lines.append("goal (every mode within 5 % of off, wall and CPU): "
                 + ("met" if not slow else "NOT met for " + ", ".join(slow)))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smolcluster bench logging", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of all modes (default 9)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.steps < 1 or args.rounds < 1:
        parser.error(f"unknown mode(s) {unknown}" if unknown else "--steps and --rounds must be at least 1")
    rows = run(args.steps, args.rounds, modes)
    if args.json:
        print(json.dumps({"steps": args.steps, "rounds": args.rounds, "goal_ratio": GOAL_RATIO,
                          "modes": [asdict(r) for r in rows]}))
    else:
        print(format_table(rows, args.steps, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
