"""The small helpers every part shares: tables, byte counts, JSON-lines readers, wait_until."""

from __future__ import annotations

import json
import threading
import time

import pytest

from smolcluster.common.errors import WaitTimeout
from smolcluster.common.jsonl import JsonlFollower, read_jsonl
from smolcluster.common.text import format_bytes, table
from smolcluster.common.wait import wait_until


def test_table_aligns_columns_and_right_aligns_numbers():
    text = table(["node", "steps"], [["mini1", "7"], ["pi4", "1234"]], right={1})
    assert text.splitlines() == ["node   steps", "-----  -----", "mini1      7", "pi4     1234"]


def test_table_without_rows_is_headers_and_dashes():
    assert table(["a", "bb"], []) == "a  bb\n-  --"


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (2_000_000, "2.0 MB"),
                                     (3_100_000_000, "3.1 GB"), (5e12, "5000.0 GB")])
def test_bytes_are_si(n, text):
    assert format_bytes(n) == text


def test_read_jsonl_skips_a_torn_last_line_and_a_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"event": "start"}\n\n[1, 2]\n{"event": "end"}\n{"event": "st')  # killed mid-write
    assert read_jsonl(path) == [{"event": "start"}, {"event": "end"}]


def test_follower_reads_only_whole_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follow = JsonlFollower(path)
    assert follow.read_new() == []  # not written yet
    with open(path, "w") as f:
        f.write(json.dumps({"v": 1}) + "\n" + '{"v": ')
        f.flush()
        assert follow.read_new() == [{"v": 1}]
        f.write("2}\n")
        f.flush()
        assert follow.read_new() == [{"v": 2}]
        assert follow.read_new() == []


def test_wait_until_returns_the_first_truthy_value():
    calls = []

    def ready():
        calls.append(1)
        return len(calls) >= 3 and "ready"

    assert wait_until(ready, timeout=5, interval=0.01) == "ready"
    assert len(calls) == 3


def test_wait_until_times_out_with_a_message_or_the_last_value():
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="waiting for the server"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the server")
    assert 0.2 <= time.monotonic() - t0 < 2
    assert wait_until(lambda: 0, timeout=0.1, interval=0.05) == 0


def test_wait_until_sees_another_thread_finish():
    done = threading.Event()
    threading.Timer(0.1, done.set).start()
    assert wait_until(done.is_set, timeout=5, interval=0.01, what="the timer")


def test_an_error_in_the_condition_ends_the_wait():
    def dead():
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until(dead, timeout=60)
