"""Telemetry: metrics as JSON lines, structured (logfmt) logs with Loki labels, and W&B runs.

- MetricsWriter: RUN_DIR/metrics.jsonl, one JSON object per line, always with "time" (unix s) and "event".
- setup_logging: a named logger writing lines like
      ts=2025-01-01T12:00:00.123Z level=INFO job=smolcluster-worker component=worker host=worker-rank0-mini2 rank=0 algorithm=edp run=hybrid-edp msg="joined" step=3
  The labels (node_labels) are the ones the original project's Loki queries select on; a shipper
  (Promtail/Alloy's logfmt stage, or a push client) turns them into Loki labels.
  Extra key=values: logger.info("msg", extra={"kv": {"step": 3}}). parse_logfmt reads a line back.
- WandbRun: never prompts, never blocks or crashes training; `import wandb` only when mode != "off" (without
  the optional wandb package, "auto" means off and "online" / "offline" warn once).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import netrc
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from smolcluster.core.algorithms import display_name

# --------------------------------------------------------------------------- metrics


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def jsonable(v: Any) -> Any:
    """Numbers, strings, lists, dicts; tensors/numpy scalars -> Python; NaN/inf -> null (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # torch tensors and numpy arrays/scalars
        return jsonable(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return str(v)


class MetricsWriter:
    """Append-only metrics.jsonl. Thread-safe; line-buffered so a crash loses at most the current line.
    `ship(line)`, when given, also gets every line (e.g. a Loki pusher; it must not block). `now` stamps
    each line (unix time; the virtual sim backend passes its simulated clock)."""

    def __init__(self, path: Path, ship: Callable[[str], None] | None = None, now: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self._ship = ship
        self._now = now

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": self._now(), "event": event, **{k: jsonable(v) for k, v in fields.items()}}
        line = json.dumps(record, allow_nan=False, separators=(",", ":"))
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
        if self._ship is not None:
            self._ship(line)

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- structured logs

# The labels every log line carries, in this order. The Loki stack filters on them.
LABELS = ("job", "component", "host", "rank", "algorithm", "run")


def node_labels(*, role: str, rank: int, hostname: str, algorithm: str, run: str) -> dict[str, Any]:
    """Loki labels as the original project named them: job smolcluster-server|smolcluster-worker, and
    host `{role}-rank{N}-{hostname}`. N (and `rank`) counts within the role from 0, as the original's
    worker ids did: a worker's is its smolcluster rank - 1 (mini2, smolcluster rank 1, is
    worker-rank0-mini2), the server's is 0."""
    index = rank - 1 if role == "worker" else 0
    return {"job": f"smolcluster-{role}", "component": role, "host": f"{role}-rank{index}-{hostname}",
            "rank": index, "algorithm": algorithm, "run": run}


def logfmt_value(v: Any) -> str:
    s = str(v)
    if s and not any(c in s for c in ' ="\\\n\r\t'):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


class LogfmtFormatter(logging.Formatter):
    """One line per record; the node's labels are fixed at construction."""

    def __init__(self, labels: dict[str, Any]):
        super().__init__()
        self.labels = " ".join(f"{k}={logfmt_value(v)}" for k, v in labels.items())

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [f"ts={ts}", f"level={record.levelname}", self.labels, f"msg={logfmt_value(record.getMessage())}"]
        kv = getattr(record, "kv", None)
        if isinstance(kv, dict):
            parts += [f"{k}={logfmt_value(v)}" for k, v in kv.items()]
        if record.exc_info:
            parts.append(f"exc={logfmt_value(self.formatException(record.exc_info))}")  # escaped: stays one line
        return " ".join(parts)


def parse_logfmt(line: str) -> dict[str, str]:
    """The key=value pairs of one logfmt line (quoted values unescaped), e.g. to check a line's labels."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key, i = line[i:eq], eq + 1
        if i < n and line[i] == '"':
            i += 1
            chars = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                    chars.append({"n": "\n", "r": "\r", "t": "\t"}.get(line[i], line[i]))
                else:
                    chars.append(line[i])
                i += 1
            value, i = "".join(chars), i + 1
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            value, i = line[i:end], end
        out[key] = value
    return out


def setup_logging(log_path: Path, *, labels: dict[str, Any], level: str = "INFO", stderr: bool = True) -> logging.Logger:
    """Logger `smolcluster.<component>.<host>` writing logfmt lines with `labels` to log_path (and stderr).

    Does not touch the root logger. Calling it again replaces this logger's handlers (no duplicates).
    """
    logger = logging.getLogger(f"smolcluster.{labels.get('component', 'node')}.{labels.get('host', '')}")
    for h in list(logger.handlers):
        if getattr(h, "_smolcluster", False):
            logger.removeHandler(h)
            h.close()
    logger.setLevel(level.upper())
    logger.propagate = False  # our handlers already carry the labels; avoid duplicates via root
    fmt = LogfmtFormatter(labels)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_path, encoding="utf-8")]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        h._smolcluster = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    return logger


# --------------------------------------------------------------------------- Weights & Biases

WANDB_PROJECT = "smolcluster"
WANDB_MODES = ("auto", "online", "offline", "off")
WANDB_INIT_TIMEOUT_S = 20.0


def wandb_run_name(algorithm: str, role: str, hostname: str, rank: int, lr: float, batch_size: int) -> str:
    return f"{display_name(algorithm)}-{role}-{hostname}_rank{rank}_lr{lr}_bs{batch_size}"


def wandb_has_credentials() -> bool:
    """True when an API key is in the environment or a netrc holds a login for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    candidates = [os.environ.get("NETRC")] + [str(Path.home() / n) for n in (".netrc", "_netrc")]
    for path in filter(None, candidates):
        try:
            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


class WandbRun:
    """A W&B run that can never hurt training: any failure -> one warning, then a no-op."""

    def __init__(self, *, mode: str, algorithm: str, role: str, hostname: str, rank: int, lr: float,
                 batch_size: int, config: dict, run_dir: Path, logger: logging.Logger | None = None,
                 project: str = WANDB_PROJECT):
        self.name = wandb_run_name(algorithm, role, hostname, rank, lr, batch_size)
        self.project = project
        self.active = False
        self.mode = "off"
        self._run: Any = None
        self.files_dir: Path | None = None
        self._log = logger or logging.getLogger("smolcluster.wandb")
        self._warned = False
        if mode not in WANDB_MODES:
            self._warn(f"unknown wandb mode {mode!r} (use {', '.join(WANDB_MODES)}); W&B disabled")
            return
        if mode == "off":
            return
        if importlib.util.find_spec("wandb") is None:  # an optional extra: a node runs without it
            if mode != "auto":
                self._warn(f"wandb mode {mode!r} but wandb is not installed (pip install 'smolcluster[wandb]'); W&B disabled")
            return
        has_key = wandb_has_credentials()
        if mode == "auto":
            mode = "online" if has_key else "offline"
        elif mode == "online" and not has_key:
            # online without a key would ask for one interactively; run offline instead (sync later)
            self._warn("wandb mode 'online' but no WANDB_API_KEY or netrc login: logging offline "
                       f"(sync later with `wandb sync {Path(run_dir) / 'wandb'}`)")
            mode = "offline"
        try:
            self._init(mode, config, Path(run_dir))
            self.mode = mode
            self.active = True
        except BaseException as e:  # noqa: BLE001 - W&B must never take training down (even SystemExit)
            if isinstance(e, KeyboardInterrupt):
                raise
            self._warn(f"W&B init failed ({type(e).__name__}: {e}); continuing without W&B")

    def _init(self, mode: str, config: dict, run_dir: Path) -> None:
        # never prompt: no TTY questions, no login, no console capture, no code/git snooping
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DISABLE_CODE", "true")
        os.environ["WANDB_MODE"] = mode  # a stale WANDB_MODE=online in the env must not override the decision
        import wandb  # heavy (~100+ MB RSS): imported only when W&B is wanted

        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            init_timeout=WANDB_INIT_TIMEOUT_S,
            console="off",
            silent=True,
            save_code=False,
            disable_git=True,
        )
        # several runs per process (sim tests run roles in threads): newer W&B spells it "create_new"
        reinit_field = getattr(wandb.Settings, "model_fields", {}).get("reinit")
        reinit: Any = "create_new" if reinit_field is not None and "create_new" in str(reinit_field.annotation) else True
        self._run = wandb.init(project=self.project, name=self.name, config=config, dir=str(run_dir),
                               mode=mode, settings=settings, reinit=reinit)
        if self._run is None:
            raise RuntimeError("wandb.init returned no run")
        self.files_dir = Path(self._run.dir).parent  # e.g. RUN_DIR/wandb/offline-run-<date>-<id>

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            self._log.warning(msg)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if not self.active:
            return
        try:
            self._run.log({k: jsonable(v) for k, v in metrics.items()}, step=step)
        except Exception as e:
            self.active = False
            self._warn(f"W&B log failed ({type(e).__name__}: {e}); W&B disabled for the rest of the run")

    def finish(self) -> None:
        if self._run is None:
            return
        run, self._run, self.active = self._run, None, False
        try:
            run.finish()
        except Exception as e:
            self._warn(f"W&B finish failed ({type(e).__name__}: {e})")


# --------------------------------------------------------------------------- progress on a terminal


class Progress:
    """A progress bar on one terminal line, redrawn at most every `redraw_s`; `note()` prints a line above
    it. Where the output is not a terminal (CI, a log file) it prints a plain line every 5% instead."""

    def __init__(self, total: int, *, out: Any = None, label: str = "", redraw_s: float = 0.25, width: int = 24):
        self.total, self.label, self.redraw_s, self.width = max(1, total), label, redraw_s, width
        self.out = out if out is not None else sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_plain = -1
        self._line = ""

    def _bar(self, step: int) -> str:
        done = int(self.width * min(step, self.total) / self.total)
        return "[" + "#" * done + "." * (self.width - done) + "]"

    def update(self, step: int, text: str = "") -> None:
        pct = 100 * min(step, self.total) / self.total
        line = f"{self.label}{self._bar(step)} {step}/{self.total} {pct:3.0f}% {text}".rstrip()
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= self.redraw_s or step >= self.total:
                self._write("\r\033[K" + line)
                self._last_draw, self._line = now, line
        else:
            bucket = int(pct // 5)
            if bucket != self._last_plain:
                self._last_plain = bucket
                self._write(line + "\n")

    def note(self, text: str) -> None:
        if self.tty and self._line:
            self._write("\r\033[K" + text + "\n" + self._line)
        else:
            self._write(text + "\n")

    def close(self) -> None:
        if self.tty and self._line:
            self._write("\n")
            self._line = ""

    def _write(self, s: str) -> None:
        try:
            self.out.write(s)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not stop training
