"""Publishing released followers: order kept, and no row deleted unless the broker has it.

A real Redis broker (kombu groups a release into one pipeline) and the in-memory broker
(every message published at once) take the same releases; no worker consumes, so the
queue itself shows what was published, and in which order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Producer, Queue

import celery_causal
from celery_causal.payload import RELEASED, build_message, pack
from celery_causal.registry import runtime_for
from celery_causal.release import _IMMEDIATE, _batch
from celery_causal.store import CausalStore
from celery_causal.testing import MemoryStore
from tests.helpers import age

SCOPE = "publishing"


@pytest.fixture(params=["redis", "memory"])
def broker(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def app(broker: str, key_prefix: str) -> Iterator[Celery]:
    app = Celery(f"publishing{uuid.uuid4().hex[:6]}", broker=broker)
    prefix = f"{key_prefix}publishing-{uuid.uuid4().hex[:6]}:"
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        task_ignore_result=True,
        causal_batch_size=50,
    )
    celery_causal.install(app, store=MemoryStore(), beat=False)
    yield app
    if broker.startswith("redis"):
        client = redis.Redis.from_url(broker)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def messages(app: Celery, queue: str) -> list[Any]:
    """The messages in ``queue``, first published first (taken off the queue)."""
    with app.connection_for_read() as conn:
        found = []
        simple = conn.SimpleQueue(queue, no_ack=True)
        try:
            while True:
                try:
                    found.append(simple.get(block=False))
                except simple.Empty:
                    return found
        finally:
            simple.close()


def queued(app: Celery, queue: str) -> list[str]:
    """Task ids in ``queue``, first published first."""
    found = messages(app, queue)
    assert all(m.headers[RELEASED] for m in found)
    return [m.headers["id"] for m in found]


def park(
    app: Celery,
    store: CausalStore,
    leader: str,
    n: int,
    queue: str,
    odd_one: tuple[int, str] = (-1, ""),
) -> list[str]:
    """Park ``n`` followers of ``leader`` bound for ``queue`` (one, optionally, elsewhere)."""
    ids = [f"f{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    for i, task_id in enumerate(ids):
        to = odd_one[1] if i == odd_one[0] else queue
        follower = pack(
            scope=SCOPE,
            task_name="tests.step",
            task_id=task_id,
            leader=leader,
            occurred_at=1000.0 + i,
            message=build_message(
                app, "tests.step", [i], {}, {"task_id": task_id, "queue": to}, "json"
            ),
            max_bytes=1 << 20,
        )
        store.park(follower, 900)
    return ids


def batches(app: Celery) -> bool:
    """Whether a release on ``app``'s broker is one pipeline: Redis, with kombu 5.7+.

    Older kombu has no ``Producer.batch``: every message is published as it is sent.
    """
    return hasattr(Producer, "batch") and app.conf.broker_url.startswith("redis")


def test_redis_releases_are_batched_and_the_memory_broker_is_not(app: Celery) -> None:
    with app.producer_or_acquire() as producer:
        batched = _batch(producer, 10) is not _IMMEDIATE
        single = _batch(producer, 1)
    assert batched == batches(app)
    assert single is _IMMEDIATE  # one message: a plain publish, no pipeline to build


def test_a_release_publishes_every_follower_in_order_and_deletes_its_rows(app: Celery) -> None:
    runtime = runtime_for(app)
    store = runtime.store
    queue = f"q-{uuid.uuid4().hex[:6]}"
    leader = "leader-" + uuid.uuid4().hex[:6]
    ids = park(app, store, leader, 120, queue)  # more than two claim batches of 50
    assert store.record_done(SCOPE, leader)

    released = runtime.release_followers(SCOPE, leader, depth=1)

    assert released == len(ids)
    assert queued(app, queue) == ids
    assert store.count_followers(SCOPE, leader) == 0


def test_a_broker_failure_mid_batch_deletes_no_row_the_broker_lacks(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 30 parked followers, and a broker connection that fails on the 20th publish
    # (simulated at kombu's publish call: the one part not made real here)
    runtime = runtime_for(app)
    store = runtime.store
    queue = f"q-{uuid.uuid4().hex[:6]}"
    leader = "leader-" + uuid.uuid4().hex[:6]
    ids = park(app, store, leader, 30, queue)
    assert store.record_done(SCOPE, leader)
    calls = 0
    real_publish = Producer.publish

    def failing_publish(self: Producer, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise ConnectionError("broker went away")
        return real_publish(self, *args, **kwargs)

    monkeypatch.setattr(Producer, "publish", failing_publish)

    # When the leader releases them
    with pytest.raises(ConnectionError):
        runtime.release_followers(SCOPE, leader, depth=1)
    monkeypatch.undo()

    # Then every follower is either in the queue with its row deleted, or still parked
    # (claimed, for the sweep): none is both gone from the table and missing from the queue
    first = queued(app, queue)
    remaining = {f.follower_id for f in store.list_followers(SCOPE, None, 1000)}
    assert set(first) | remaining == set(ids)
    assert not set(first) & remaining
    assert first == ids[: len(first)]
    # A batch is published whole or not at all; one message at a time, up to the failure.
    assert len(first) == (0 if batches(app) else 19)

    # And the sweep republishes the rest, in order, once the claim is older than the
    # release timeout
    age(store, runtime.settings.release_timeout + 1)
    report = runtime.sweep()
    assert report.released == len(remaining)
    assert queued(app, queue) == ids[len(first) :]
    assert store.list_followers(SCOPE, None, 1000) == []


def test_a_follower_bound_for_a_retired_queue_is_moved_aside_not_blocking_others(
    app: Celery,
) -> None:
    # Given 30 parked followers, the 20th routed to a queue the app no longer knows
    # (task_create_missing_queues off and the queue gone from its configuration)
    runtime = runtime_for(app)
    store = runtime.store
    queue, retired = f"q-{uuid.uuid4().hex[:6]}", f"retired-{uuid.uuid4().hex[:6]}"
    leader = "leader-" + uuid.uuid4().hex[:6]
    ids = park(app, store, leader, 30, queue, odd_one=(19, retired))
    assert store.record_done(SCOPE, leader)
    app.amqp.queues.create_missing = False
    del app.amqp.queues[retired]

    # When the leader releases them
    released = runtime.release_followers(SCOPE, leader, depth=1)

    # Then the others are published in order, and that one is kept for an operator
    assert released == 29
    assert queued(app, queue) == ids[:19] + ids[20:]
    assert store.list_followers(SCOPE, None, 1000) == []
    [stats] = store.stats()
    assert stats.dead == 1


def test_a_released_message_keeps_its_priority_and_its_expiry_counts_from_the_release(
    app: Celery,
) -> None:
    # Given a follower sent with a priority and an expiry an hour away
    runtime = runtime_for(app)
    queue = f"q-{uuid.uuid4().hex[:6]}"
    leader, task_id = "leader-" + uuid.uuid4().hex[:6], "f-" + uuid.uuid4().hex[:6]
    expires = datetime.now(timezone.utc) + timedelta(hours=1)
    message = build_message(
        app,
        "tests.step",
        [1],
        {},
        {"task_id": task_id, "queue": queue, "priority": 3, "expires": expires.isoformat()},
        "json",
    )
    runtime.store.park(
        pack(
            scope=SCOPE,
            task_name="tests.step",
            task_id=task_id,
            leader=leader,
            occurred_at=1.0,
            message=message,
            max_bytes=1 << 20,
        ),
        900,
    )
    assert runtime.store.record_done(SCOPE, leader)
    # When its leader releases it
    assert runtime.release_followers(SCOPE, leader, depth=1) == 1
    # Then the broker gets it with its priority, its expiry header, and a TTL of what is
    # left of the hour (kombu carries it in milliseconds)
    [received] = messages(app, queue)
    assert received.headers["id"] == task_id
    assert received.headers["expires"] == expires.isoformat()
    assert received.properties["priority"] == 3
    ttl_ms = int(received.properties["expiration"])
    assert 3_500_000 < ttl_ms <= 3_600_000


def test_a_follower_routed_through_a_topic_exchange_is_released_to_its_queue(
    app: Celery,
) -> None:
    # Given a queue bound to a topic exchange by a pattern, declared by a consumer's
    # connection, and a follower delivered through that exchange with a key the pattern
    # matches (as a worker parks it: exchange and routing key, no queue name)
    runtime = runtime_for(app)
    name = f"q-{uuid.uuid4().hex[:6]}"
    queue = Queue(name, Exchange(f"{name}-topic", type="topic"), routing_key=f"{name}.#")
    app.conf.task_queues = [queue]
    with app.connection_for_write() as conn:
        queue.bind(conn.default_channel).declare()
    leader, task_id = "leader-" + uuid.uuid4().hex[:6], "f-" + uuid.uuid4().hex[:6]
    options = {"task_id": task_id, "exchange": f"{name}-topic", "routing_key": f"{name}.orders"}
    message = build_message(app, "tests.step", [1], {}, options, "json")
    follower = pack(
        scope=SCOPE,
        task_name="tests.step",
        task_id=task_id,
        leader=leader,
        occurred_at=1.0,
        message=message,
        max_bytes=1 << 20,
    )
    runtime.store.park(follower, 900)
    assert runtime.store.record_done(SCOPE, leader)
    # When its leader releases it, from a connection that never declared the exchange
    assert runtime.release_followers(SCOPE, leader, depth=1) == 1
    # Then it is in the queue (kombu's Redis transport took an undeclared exchange for a
    # direct one, matched no binding, and dropped the message)
    assert queued(app, name) == [task_id]
