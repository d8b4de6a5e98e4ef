"""Several sweeps at once (two beats by mistake, a manual sweep during a scheduled one)."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter

import pytest
import redis
from celery import Celery

import celery_causal
from celery_causal.registry import runtime_for
from celery_causal.sql import SQLStore
from tests.helpers import age, follower


@pytest.mark.timeout(300)
def test_four_sweeps_release_each_of_2000_lost_followers_exactly_once(
    pg_store: SQLStore, pg_url: str, redis_url: str, key_prefix: str
) -> None:
    # Given 2,000 followers parked longer than the lookback, and a real Redis broker
    prefix = f"{key_prefix}sweeps-{uuid.uuid4().hex[:6]}:"
    app = Celery("sweeps", broker=redis_url)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        causal_store_url=pg_url,
        causal_lookback=60,
        causal_seen_ttl=120,
        causal_batch_size=50,
    )
    celery_causal.install(app, beat=False)
    for i in range(2000):
        pg_store.park(follower(f"lost-{i}", f"gone-{i % 7}", occurred_at=float(i)), 60)
    age(pg_store, 61)
    runtime = runtime_for(app)
    barrier = threading.Barrier(4)
    released: list[int] = []

    def sweep() -> None:
        barrier.wait()
        released.append(runtime.sweep().released)

    # When four sweeps start together
    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)

    # Then the broker received each follower exactly once, and the table is empty
    client = redis.Redis.from_url(redis_url)
    messages = client.lrange(f"{prefix}celery", 0, -1)
    ids = Counter(json.loads(m)["headers"]["id"] for m in messages)
    assert sum(released) == 2000
    assert len(ids) == 2000 and max(ids.values()) == 1
    assert pg_store.stats() == []
    client.delete(f"{prefix}celery")
