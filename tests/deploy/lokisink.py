"""A Loki push receiver to run inside a rehearsal host: `python lokisink.py PORT OUT.json`.

Listens on 0.0.0.0:PORT (smolcluster.bench.logging.PushSink); writes OUT.json.ready once listening
and, on SIGTERM, every received (labels, ns timestamp, line) to OUT.json."""

import json
import signal
import sys
import threading
from pathlib import Path

from smolcluster.bench.logging import PushSink

port, out = int(sys.argv[1]), Path(sys.argv[2])
sink = PushSink(bind="0.0.0.0", port=port)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
Path(str(out) + ".ready").write_text(sink.url)
stop.wait()
out.write_text(json.dumps(sink.lines()))
sink.close()
