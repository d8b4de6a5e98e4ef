"""What the broker does with a parked follower's message, checked on Redis and RabbitMQ.

Each test reads what the worker itself received (``task.request.delivery_info``, recorded
by the ``acc.probe`` and ``acc.hold`` tasks), not what celery-causal meant to publish.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.acceptance.brokers import every_broker, rabbitmq_queues
from tests.acceptance.conftest import Log, Spawned, WorkerProcess
from tests.helpers import wait_for


def deliveries(log: Log, n: int) -> dict[str, dict[str, Any]]:
    """The first ``n`` deliveries the probe logged, by label."""
    return {seen["label"]: seen for seen in map(json.loads, log.wait_len(n)[:n])}


@every_broker
def test_a_release_keeps_the_exchange_routing_key_priority_and_reply_to(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a follower sent through a topic exchange to a priority queue (x-max-priority),
    # with a priority and a reply-to queue of its own, and a control sent the same way
    # without a leader, which runs at once: what the broker delivers when nothing parks
    s = spawn()
    names, log, leader_log = s.handle.routing, s.log("routing"), s.log("leader")
    leader, reply_to = f"leader-{uuid.uuid4()}", f"{s.handle.prefix}replies-{uuid.uuid4().hex}"
    # (queue= makes the producer declare the exchange: kombu's Redis transport routes by
    # the exchange type its own connection declared)
    options = dict(
        queue=names.routed, routing_key=f"{names.routed}.orders", priority=7, reply_to=reply_to
    )
    follower = s.handle.probe.apply_async((log.name, "follower"), follows=leader, **options)
    wait_for(lambda: s.store.count_followers("acc", leader) == 1, 60, "the follower parked")
    s.handle.probe.apply_async((log.name, "control"), **options)
    deliveries(log, 1)
    # When its leader succeeds and releases it
    s.handle.step.apply_async((leader_log.name, "leader"), task_id=leader).get(timeout=60)
    assert follower.get(timeout=60) == "follower"
    # Then the worker received the released follower as the control was delivered: same
    # exchange and routing key (so the same queue), priority and reply-to
    seen = deliveries(log, 2)
    released, control = seen["follower"], seen["control"]
    assert released["released"] == "leader" and control["released"] is None
    assert control["exchange"] == names.topic
    assert control["routing_key"] == f"{names.routed}.orders"
    assert (control["priority"], control["reply_to"]) == (7, reply_to)
    for key in ("exchange", "routing_key", "priority", "reply_to"):
        assert released[key] == control[key], key
    wait_for(lambda: s.messages_held(names.routed) == 0, 60, "the routed queue drained")


def _park_behind_a_held_leader(s: Spawned, log: Log, n: int) -> str:
    """``n`` followers parked behind a leader whose body runs and waits for a go."""
    leader = f"held-{uuid.uuid4()}"
    for i in range(n):
        s.handle.step.apply_async((log.name, f"f{i}"), task_id=f"{leader}-f{i}", follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == n, 60, f"{n} parked")
    s.handle.hold.apply_async((log.name, "leader"), task_id=leader)
    wait_for(lambda: "leader:first" in log.entries(), 60, "the leader's body running")
    return leader


def _let_it_finish_and_check(s: Spawned, log: Log, n: int) -> None:
    # The leader comes back as a redelivery (acks_late), runs once more and releases
    # its followers; nothing ran before it, nothing was lost, nothing ran twice
    wait_for(lambda: "leader:redelivered" in log.entries(), 120, "the leader redelivered")
    assert log.entries() == ["leader:first", "leader:redelivered"]
    log.client.rpush(f"{s.handle.prefix}go:leader", "go")
    ran = log.wait_len(2 + n)
    assert ran[:2] == ["leader:first", "leader:redelivered"]
    assert Counter(ran[2:]) == Counter(f"f{i}" for i in range(n))
    wait_for(lambda: s.store.stats() == [], 60, "an empty follower table")
    wait_for(lambda: s.messages_held() == 0, 60, "no message left queued or unacked")
    assert len(log.entries()) == 2 + n


@every_broker
@pytest.mark.timeout(300)
def test_a_leader_whose_pool_process_dies_mid_body_comes_back_and_releases_its_followers(
    spawn: Callable[..., Spawned],
) -> None:
    # Given acks_late (with task_reject_on_worker_lost) and a leader mid-body with three
    # followers parked behind it
    s = spawn(CAUSAL_TEST_ACKS_LATE="1")
    log = s.log("pool-kill")
    _park_behind_a_held_leader(s, log, 3)
    # When the pool process running it is killed: the worker rejects the message, requeued
    for pid in s.worker.pool_pids():
        os.kill(pid, signal.SIGKILL)
    _let_it_finish_and_check(s, log, 3)


@pytest.mark.brokers("rabbitmq")
@pytest.mark.timeout(300)
def test_a_worker_killed_whole_mid_body_hands_its_messages_back(
    spawn: Callable[..., Spawned],
) -> None:
    # Given acks_late, and a leader mid-body with three followers parked behind it
    s = spawn(CAUSAL_TEST_ACKS_LATE="1")
    log = s.log("worker-kill")
    _park_behind_a_held_leader(s, log, 3)
    # When the whole worker (main process and pool) is SIGKILLed, and another starts:
    # RabbitMQ hands back every message the dead connection had not acked
    s.worker.kill()
    s.worker = WorkerProcess(s.env, s.worker.log_path.with_suffix(".2.log"), "successor")
    s.worker.start()
    try:
        _let_it_finish_and_check(s, log, 3)
    finally:
        s.worker.stop()


@pytest.mark.brokers("rabbitmq")
def test_followers_park_and_release_through_a_quorum_queue(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a worker consuming a quorum queue, and on it a chain of four sent backwards
    # plus three more followers of its first task: six parked before the first is sent
    s = spawn(CAUSAL_TEST_QUORUM_QUEUE="1")
    names, log, run = s.handle.routing, s.log("quorum"), uuid.uuid4().hex[:6]
    assert rabbitmq_queues(s.env["CAUSAL_TEST_BROKER_URL"], "type")[names.quorum] == ["quorum"]
    for i in range(3, 0, -1):
        s.handle.probe.apply_async(
            (log.name, f"c{i}"),
            task_id=f"{run}-c{i}",
            follows=f"{run}-c{i - 1}",
            queue=names.quorum,
        )
    for i in range(3):
        s.handle.probe.apply_async((log.name, f"f{i}"), follows=f"{run}-c0", queue=names.quorum)
    wait_for(lambda: sum(x.waiting for x in s.store.stats()) == 6, 60, "six parked")
    # When the first is sent
    s.handle.probe.apply_async((log.name, "c0"), task_id=f"{run}-c0", queue=names.quorum)
    # Then all run, each once, in causal order, the released ones delivered through the
    # quorum queue too
    entries = [json.loads(e) for e in log.wait_len(7)]
    labels = [e["label"] for e in entries]
    assert Counter(labels) == Counter(["c0", "c1", "c2", "c3", "f0", "f1", "f2"])
    assert [label for label in labels if label.startswith("c")] == ["c0", "c1", "c2", "c3"]
    assert labels[0] == "c0"
    assert {e["routing_key"] for e in entries} == {names.quorum}
    assert [e["label"] for e in entries if e["released"] != "leader"] == ["c0"]
    wait_for(lambda: s.store.stats() == [], 60, "an empty follower table")
    wait_for(lambda: s.messages_held(names.quorum) == 0, 60, "the quorum queue drained")
