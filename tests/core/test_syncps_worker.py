"""The SyncPS worker's work between its push and the server's reply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from smolcluster.core.algorithms.syncps import Worker


def worker_with(polyak_alpha: float, worker_update_interval: int) -> tuple[Worker, list[str]]:
    calls: list[str] = []
    w = Worker.__new__(Worker)  # the decision only: no connection, model or data
    w.nn = SimpleNamespace(polyak_alpha=polyak_alpha)
    w.cluster = SimpleNamespace(worker_update_interval=worker_update_interval)
    w.local_step = lambda: calls.append("local step")
    w.prefetch = lambda step: calls.append(f"prefetch {step}")
    return w, calls


def test_no_local_step_when_the_server_weights_replace_it_after_every_step():
    w, calls = worker_with(polyak_alpha=1.0, worker_update_interval=1)  # the defaults
    w.meanwhile(7)
    assert calls == ["prefetch 7"]


@pytest.mark.parametrize("alpha, interval", [(0.5, 1), (1.0, 2), (0.5, 3)])
def test_a_local_step_when_it_survives_the_reply(alpha, interval):
    w, calls = worker_with(polyak_alpha=alpha, worker_update_interval=interval)
    w.meanwhile(7)
    assert calls == ["local step", "prefetch 7"]
