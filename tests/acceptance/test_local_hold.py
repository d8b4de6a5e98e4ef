"""A follower whose leader runs in the same prefork worker is held by the worker's main
process, not parked; it is handed to the pool when the leader finishes, or after
``causal_local_hold`` seconds (holding.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery.utils import uuid

from celery_causal.errors import LeaderFailed
from tests.acceptance.brokers import every_broker
from tests.acceptance.conftest import Spawned, WorkerProcess, recorded
from tests.helpers import wait_for

# Holding relies on Celery's strategy and request internals: run against the oldest
# Celery admitted too (.ci/oldest-celery). ``celery inspect reserved`` through kombu 5.5's
# Redis transport calls redis-py's get_connection the way redis-py 5.3 deprecated.
pytestmark = [
    pytest.mark.core,
    pytest.mark.filterwarnings("ignore:Call to 'get_connection':DeprecationWarning"),
]


def parked(s: Spawned) -> list[str]:
    return recorded(s.env["CAUSAL_TEST_REDIS_URL"], s.handle.prefix, "parked")


def reserved(s: Spawned) -> set[str]:
    """Ids of the requests the worker holds or has not yet handed to a pool process."""
    replies = s.handle.app.control.inspect([s.worker.nodename], timeout=5).reserved() or {}
    return {r["id"] for requests in replies.values() for r in requests}


def leader_running(s: Spawned, log_name: str, fail: bool = False) -> Any:
    """The ``hold`` task, started in a pool process and waiting for the test's go."""
    leader = s.handle.hold.apply_async((log_name, "leader", fail))
    log = s.log(log_name)
    wait_for(lambda: log.entries() == ["leader:first"], 60, "the leader to start")
    return leader


def go(s: Spawned, label: str = "leader") -> None:
    s.log("unused").client.rpush(f"{s.handle.prefix}go:{label}", "go")


@every_broker
def test_followers_of_a_running_leader_wait_in_the_worker_and_never_park(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a leader running in one of the worker's two pool processes
    s = spawn(CAUSAL_LOCAL_HOLD="120")
    log = s.log("chain")
    leader = leader_running(s, log.name)
    # When a chain of three followers arrives while it runs
    f1 = s.handle.step.apply_async((log.name, "f1"), follows=leader)
    f2 = s.handle.step.apply_async((log.name, "f2"), follows=f1)
    f3 = s.handle.step.apply_async((log.name, "f3"), follows=f2)
    ids = {f1.id, f2.id, f3.id}
    # Then the worker holds all three, unacked, while the other pool process stays free
    wait_for(lambda: reserved(s) >= ids, 60, "the followers held")
    assert s.handle.ping.delay().get(timeout=30) == "pong"
    assert log.entries() == ["leader:first"]
    assert sum(x.waiting for x in s.store.stats()) == 0
    # And once the leader finishes, they run in order without ever parking
    go(s)
    assert log.wait_len(4, 60) == ["leader:first", "f1", "f2", "f3"]
    assert f3.get(timeout=30) == "f3"
    assert not ids & set(parked(s))
    assert not reserved(s)


def test_a_hold_ends_after_causal_local_hold_and_the_follower_parks(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a leader that runs longer than the hold
    s = spawn(CAUSAL_LOCAL_HOLD="0.5")
    log = s.log("limit")
    leader = leader_running(s, log.name)
    # When a follower arrives, it is handed to the pool after half a second and parks
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in parked(s), 60, "the follower parked")
    assert follower.state == "DEFERRED"
    assert log.entries() == ["leader:first"]
    # Then the leader's success releases it
    go(s)
    assert follower.get(timeout=60) == "f"
    assert log.entries() == ["leader:first", "f"]


def test_no_hold_when_causal_local_hold_is_zero(spawn: Callable[..., Spawned]) -> None:
    s = spawn(CAUSAL_LOCAL_HOLD="0")
    log = s.log("nohold")
    leader = leader_running(s, log.name)
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in parked(s), 60, "the follower parked")
    go(s)
    assert follower.get(timeout=60) == "f"


def test_a_held_follower_of_a_leader_that_fails_follows_the_failure_policy(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_LOCAL_HOLD="120", CAUSAL_ON_LEADER_FAILURE="fail")
    log = s.log("fails")
    leader = leader_running(s, log.name, fail=True)
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in reserved(s), 60, "the follower held")
    go(s)
    # Handed over as soon as the leader failed (well inside the 120 s hold)
    result = follower.get(timeout=60, propagate=False)
    assert isinstance(result, LeaderFailed) and leader.id in str(result)
    assert log.entries() == ["leader:first"]
    assert follower.id not in parked(s)


def test_a_held_follower_of_a_leader_that_fails_under_wait_parks_at_once(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_LOCAL_HOLD="120")
    log = s.log("waits")
    leader = leader_running(s, log.name, fail=True)
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in reserved(s), 60, "the follower held")
    go(s)
    wait_for(lambda: follower.id in parked(s), 60, "the follower parked")
    assert follower.state == "DEFERRED"
    assert log.entries() == ["leader:first"]


def test_revoking_a_held_follower_hands_its_own_followers_over(
    spawn: Callable[..., Spawned],
) -> None:
    # Given f1 held behind a running leader, and f2 held behind f1
    s = spawn(CAUSAL_LOCAL_HOLD="120")
    log = s.log("revoked")
    leader = leader_running(s, log.name)
    f1 = s.handle.step.apply_async((log.name, "f1"), follows=leader)
    f2 = s.handle.step.apply_async((log.name, "f2"), follows=f1)
    wait_for(lambda: reserved(s) >= {f1.id, f2.id}, 60, "both held")
    # When f1 is revoked and the leader finishes
    s.handle.app.control.revoke(f1.id, destination=[s.worker.nodename], reply=True)
    go(s)
    # Then f1 never runs and f2 is handed over at once: it parks behind f1, which will
    # never succeed, instead of staying held for the 120 s limit
    wait_for(lambda: f2.id in parked(s), 60, "f2 parked")
    assert f1.state == "REVOKED"
    assert log.entries() == ["leader:first"]


def test_a_worker_killed_while_holding_loses_no_follower(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a follower held behind a running leader, its message unacked
    s = spawn(CAUSAL_LOCAL_HOLD="120", CAUSAL_TEST_VISIBILITY_TIMEOUT="3")
    log = s.log("killed")
    leader = leader_running(s, log.name)
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in reserved(s), 60, "the follower held")
    # When the whole worker is SIGKILLed and another one starts
    s.worker.kill()
    restarted = WorkerProcess(s.env, s.log_dir / "restarted.log", "restarted")
    restarted.start()
    try:
        # Then the broker delivers the follower again; its leader never finished, so it
        # parks (and waits for the sweep), it does not run
        # (kombu 5.5's Redis transport took about 100 s to restore it here, 5.7's seconds)
        wait_for(lambda: follower.id in parked(s), 240, "the follower parked again")
        assert follower.state == "DEFERRED"
        assert "f" not in log.entries()
    finally:
        restarted.stop()


def test_held_requests_never_take_the_prefetch_places_of_the_pool_processes(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a prefetch window of 2 messages for 2 pool processes, one running a leader
    s = spawn("--prefetch-multiplier", "1", CAUSAL_LOCAL_HOLD="120")
    log = s.log("window")
    leader = leader_running(s, log.name)
    # When a follower arrives, holding it would leave the idle process nothing to fetch:
    # it is handed over and parks at once, well inside the 120 s hold
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader)
    wait_for(lambda: follower.id in parked(s), 60, "the follower parked")
    # And an unrelated task runs on the idle process meanwhile
    assert s.handle.ping.delay().get(timeout=30) == "pong"
    go(s)
    assert follower.get(timeout=60) == "f"


@every_broker
def test_a_chain_sent_last_link_first_runs_in_order_without_a_park(
    spawn: Callable[..., Spawned],
) -> None:
    # Given an idle worker whose lookahead outlasts any delivery gap here
    s = spawn(CAUSAL_LOCAL_HOLD="120", CAUSAL_LOCAL_LOOKAHEAD="60")
    log = s.log("reversed")
    ids = [uuid() for _ in range(4)]
    # When a chain of four is sent last link first
    for k in (3, 2, 1):
        s.handle.step.apply_async((log.name, f"s{k}"), task_id=ids[k], follows=ids[k - 1])
    # Then the followers wait in the worker for the leaders they have not seen yet
    wait_for(lambda: reserved(s) >= set(ids[1:]), 60, "the followers held")
    assert log.entries() == []
    s.handle.step.apply_async((log.name, "s0"), task_id=ids[0])
    # And once the head arrives the links run in order, none parked
    assert log.wait_len(4, 60) == ["s0", "s1", "s2", "s3"]
    assert not set(ids) & set(parked(s))
    assert not reserved(s)


def test_a_follower_whose_leader_does_not_come_parks_after_the_lookahead(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_LOCAL_HOLD="120", CAUSAL_LOCAL_LOOKAHEAD="0.5")
    log = s.log("lookahead")
    leader_id = uuid()
    follower = s.handle.step.apply_async((log.name, "f"), follows=leader_id)
    wait_for(lambda: follower.id in parked(s), 60, "the follower parked")
    assert follower.state == "DEFERRED"
    # Its leader, sent later, releases it as usual
    s.handle.step.apply_async((log.name, "leader"), task_id=leader_id)
    assert follower.get(timeout=60) == "f"
    assert log.entries() == ["leader", "f"]
