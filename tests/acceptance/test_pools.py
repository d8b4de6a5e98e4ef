"""Causal tasks under each of Celery's execution pools, in a real ``celery worker -P <pool>``.

Under prefork each task runs in a pool process with an engine of its own; under threads and
gevent many tasks share the worker's one engine (gevent: greenlets on sockets that Celery
monkey-patched before importing the app, psycopg waiting through the patched select);
under solo the consumer runs each task itself, so a release publishes from the thread that
also consumes.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from tests.acceptance.brokers import every_broker
from tests.acceptance.conftest import Spawned
from tests.helpers import wait_for

IMPLEMENTATION = {
    "prefork": "celery.concurrency.prefork:TaskPool",
    "threads": "celery.concurrency.thread:TaskPool",
    "solo": "celery.concurrency.solo:TaskPool",
    "gevent": "celery.concurrency.gevent:TaskPool",
}


@every_broker
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool", list(IMPLEMENTATION))
def test_each_pool_parks_and_releases_in_causal_order(
    spawn: Callable[..., Spawned], pool: str
) -> None:
    s = spawn(pool=pool)
    stats = s.handle.app.control.inspect([s.worker.nodename], timeout=10).stats()
    assert stats[s.worker.nodename]["pool"]["implementation"] == IMPLEMENTATION[pool]
    log, run = s.log(f"pool-{pool}"), uuid.uuid4().hex[:6]
    # Given one leader's six followers, parked before it is sent
    leader = f"{run}-leader"
    for i in range(6):
        s.handle.step.apply_async((log.name, f"f{i}"), task_id=f"{run}-f{i}", follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == 6, 60, "six parked")
    # and ten chains of four, each sent backwards: every follower before its leader
    for c in range(10):
        for i in range(3, -1, -1):
            s.handle.step.apply_async(
                (log.name, f"c{c}:{i}"),
                task_id=f"{run}-c{c}-{i}",
                follows=f"{run}-c{c}-{i - 1}" if i else None,
            )
    # When the leader comes
    s.handle.step.apply_async((log.name, "leader"), task_id=leader)
    # Then every body runs once, each after its leader
    ran = log.wait_len(47, timeout=180)
    expected = ["leader", *(f"f{i}" for i in range(6))]
    expected += [f"c{c}:{i}" for c in range(10) for i in range(4)]
    assert Counter(ran) == Counter(expected)
    assert ran.index("leader") < min(ran.index(f"f{i}") for i in range(6))
    for c in range(10):
        assert [e for e in ran if e.startswith(f"c{c}:")] == [f"c{c}:{i}" for i in range(4)]
    assert s.store.stats() == []
    # and the worker stops cleanly: no task, greenlet or thread stuck on the store
    s.worker.stop()
    assert s.worker.proc is not None and s.worker.proc.returncode == 0
