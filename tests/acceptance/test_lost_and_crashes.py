"""Lost followers, the beat sweep, crashes and failed leaders, with real worker processes.

Each test starts a worker of its own (own database, own Redis key prefix) with short
durations, and waits on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text

from celery_causal.sql.schema import followers
from celery_causal.wiring import SWEEP_TASK
from tests.acceptance.brokers import every_broker
from tests.acceptance.conftest import CeleryProcess, Log, Spawned, WorkerProcess, retried
from tests.conftest import PG_ADMIN_URL
from tests.helpers import wait_for


def sweep(s: Spawned) -> dict[str, int]:
    """One sweep, run by the worker as beat would run it, its outcome asked for."""
    sent = s.handle.app.send_task(SWEEP_TASK, ignore_result=False)
    result: dict[str, int] = sent.get(timeout=60)
    return result


def released_by_sweep(worker: WorkerProcess) -> list[str]:
    return [
        line.split("released task ")[1].split(" ")[0]
        for line in worker.log_text().splitlines()
        if "released task " in line and line.endswith("by sweep")
    ]


def send_reversed_chains(s: Spawned, log: Log, chains: int, depth: int) -> None:
    """Chains c0 <- c1 <- ... sent fully reversed; bodies log "c<chain>:<step>"."""
    run = uuid.uuid4().hex[:6]
    for c in range(chains):
        for i in range(depth - 1, -1, -1):
            s.handle.step.apply_async(
                (log.name, f"c{c}:{i}"),
                task_id=f"{run}-c{c}-{i}",
                follows=f"{run}-c{c}-{i - 1}" if i else None,
            )


def broker_settled(s: Spawned) -> bool:
    """Every message the broker delivered is finished: none queued, none unacked.

    With acks_late a message stays unacked until its task ended (or it is requeued), so
    once this holds no further run of any body can come from a message already sent.
    """
    return s.messages_held() == 0


def oldest_claim_age(s: Spawned) -> float:
    with s.store.engine.connect() as conn:
        oldest = conn.execute(select(func.min(followers.c.claimed_at))).scalar()
    return 0.0 if oldest is None else s.store.clock() - oldest


# Not in the core subset run on the oldest Celery: it asks the worker's sweep for its
# outcome per call (ignore_result=False), which Celery 5.5's tracer does not honour. The
# core subset has the sweep run by beat and by the CLI.
@every_broker
def test_lost_followers_wait_for_the_lookback_then_come_back_in_occurred_order(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_LOOKBACK="4", CAUSAL_SEEN_TTL="60")
    log, run = s.log("lost"), uuid.uuid4().hex[:6]
    base = time.time()
    # Given one <- two <- (three_a, three_b), sent backwards, and "one" never comes
    for label, leader, offset in [("three_b", "two", 3), ("three_a", "two", 2), ("two", "one", 1)]:
        s.handle.step.apply_async(
            (log.name, label),
            task_id=f"{run}-{label}",
            follows=f"{run}-{leader}",
            headers={"causal_published_at": base + offset},
        )
    wait_for(lambda: sum(x.waiting for x in s.store.stats()) == 3, 60, "three parked")
    # When a sweep runs before the lookback, nothing is released
    assert sweep(s)["released"] == 0
    assert log.entries() == []
    # When the lookback has passed, the sweep releases "two", whose leader never came; the
    # others' leader did come (it was parked), so they wait for it and it releases them
    wait_for(lambda: sum(x.overdue for x in s.store.stats()) == 1, 60, "lookback passed")
    assert sweep(s)["released"] == 1
    ran = log.wait_len(3)
    # Then the chain runs in causal order: "two" first, then its followers
    assert ran[0] == "two" and sorted(ran[1:]) == ["three_a", "three_b"]
    assert released_by_sweep(s.worker) == [f"{run}-two"]
    assert s.store.stats() == []


@pytest.mark.core
@pytest.mark.timeout(300)
def test_beat_schedules_the_sweep_despite_a_later_beat_schedule_assignment(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    # causal_app assigns app.conf.beat_schedule = {...} after install(app)
    s = spawn(CAUSAL_LOOKBACK="2", CAUSAL_SEEN_TTL="60", CAUSAL_SWEEP_INTERVAL="1")
    beat = CeleryProcess(
        s.env,
        tmp_path / "beat.log",
        ["beat", "-l", "info", "-s", str(tmp_path / "beat-schedule"), "--max-interval", "1"],
    )
    beat.start()
    try:
        log = s.log("beat")
        result = s.handle.step.apply_async((log.name, "lost"), follows=f"never-{uuid.uuid4()}")
        # No manual sweep: beat sends celery_causal.sweep every second
        assert result.get(timeout=120) == "lost"
        assert log.entries() == ["lost"]
        beat_log = beat.log_text()
        assert f"Sending due task celery-causal-sweep ({SWEEP_TASK})" in beat_log
    finally:
        beat.stop()


@pytest.mark.timeout(300)
def test_worker_killed_between_claim_and_publish_loses_no_follower(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a worker whose processes die right after claiming followers for release
    s = spawn(CELERY_CAUSAL_CRASH_AFTER_CLAIM="leader", CAUSAL_RELEASE_TIMEOUT="2")
    log, leader = s.log("crash"), f"crash-leader-{uuid.uuid4()}"
    for i in range(5):
        s.handle.step.apply_async((log.name, f"f{i}"), follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == 5, 60, "five parked")
    s.handle.step.apply_async((log.name, "leader"), task_id=leader)
    wait_for(lambda: "CRASH_AFTER_CLAIM=leader: killing" in s.worker.log_text(), 60, "crash")
    assert log.entries() == ["leader"]
    assert sum(x.releasing for x in s.store.stats()) == 5  # claimed, never published
    # When the worker is killed and restarted without the fault, and one sweep runs
    s.worker.kill()
    env = {k: v for k, v in s.env.items() if k != "CELERY_CAUSAL_CRASH_AFTER_CLAIM"}
    s.worker = WorkerProcess(env, s.worker.log_path.with_suffix(".2.log"), "restarted")
    s.worker.start()
    try:
        s.wait_ready()
        wait_for(lambda: oldest_claim_age(s) > 2, 60, "release timeout")
        assert sweep(s)["released"] == 5
        # Then every follower ran, after its leader
        ran = log.wait_len(6)
        assert ran[0] == "leader"
        assert Counter(ran[1:]) == Counter(f"f{i}" for i in range(5))
    finally:
        s.worker.stop()


@every_broker
@pytest.mark.timeout(300)
@pytest.mark.parametrize("deduplicate", ["always", "redelivered"])
def test_worker_killed_after_its_done_record_loses_no_follower(
    spawn: Callable[..., Spawned], deduplicate: str
) -> None:
    # Given acks_late workers whose processes die after every done record, which on
    # PostgreSQL also claimed the task's first followers, before publishing them. The
    # record comes after Celery's tracer stored the task's SUCCESS, so Celery acks the
    # message of the lost process instead of requeueing it (under either deduplicate
    # setting no copy comes back to run twice)
    s = spawn(
        CAUSAL_TEST_ACKS_LATE="1",
        CELERY_CAUSAL_CRASH_AFTER_DONE="1",
        CAUSAL_DEDUPLICATE=deduplicate,
        CAUSAL_RELEASE_TIMEOUT="2",
    )
    log = s.log("after-done")
    # When a chain of 4 arrives fully reversed, and sweeps run as beat would run them
    send_reversed_chains(s, log, chains=1, depth=4)

    def chain_ran() -> bool:
        if oldest_claim_age(s) > 2:
            sweep(s)  # republishes the followers a killed leader left claimed
        return len(log.entries()) == 4

    wait_for(chain_ran, 120, "the whole chain")
    # Then each follower comes back within the release timeout rather than the lookback
    # (the sweep republishes what the dead process left claimed), and the chain runs in
    # order, each body once
    assert log.entries() == [f"c0:{i}" for i in range(4)]
    wait_for(lambda: s.worker.log_text().count("CRASH_AFTER_DONE=1: killing") == 4, 60, "4 kills")
    # and every done record came after the task's SUCCESS was stored: Celery saw each
    # lost task as succeeded, and acked it rather than requeueing it
    wait_for(
        lambda: s.worker.log_text().count("succeeded before the worker was lost") == 4,
        60,
        "4 tasks seen as succeeded before their process was lost",
    )
    wait_for(lambda: s.store.stats() == [], 60, "an empty follower table")
    wait_for(lambda: broker_settled(s), 60, "no message left queued or unacked")
    assert log.entries() == [f"c0:{i}" for i in range(4)]
    s.worker.stop()


@pytest.mark.timeout(300)
def test_leader_killed_after_its_record_leaves_no_follower_to_the_lookback(
    spawn: Callable[..., Spawned],
) -> None:
    # Given an acks_late worker whose processes die after every done record, claiming two
    # followers with it (causal_batch_size=2), a lookback far longer than the test, and
    # one leader with five parked followers
    s = spawn(
        CAUSAL_TEST_ACKS_LATE="1",
        CELERY_CAUSAL_CRASH_AFTER_DONE="1",
        CAUSAL_BATCH_SIZE="2",
        CAUSAL_RELEASE_TIMEOUT="2",
        CAUSAL_LOOKBACK="900",
    )
    log, leader = s.log("rest"), f"rest-leader-{uuid.uuid4()}"
    for i in range(5):
        s.handle.step.apply_async((log.name, f"f{i}"), follows=leader, task_id=f"{leader}-f{i}")
    wait_for(lambda: s.store.count_followers("acc", leader) == 5, 60, "five parked")
    # When the leader runs, its SUCCESS is stored, then its done record with the first two
    # followers claimed, and its process dies before publishing any follower
    result = s.handle.step.apply_async((log.name, "leader"), task_id=leader)
    assert result.get(timeout=60) == "leader"
    wait_for(lambda: "CRASH_AFTER_DONE=1: killing" in s.worker.log_text(), 60, "the kill")

    # Then, with sweeps running as beat runs them, every follower comes back well within
    # the lookback: the two left claimed once the release timeout passed, and the three
    # the dead process had not claimed (the leader's message, whose SUCCESS was stored, is
    # acked rather than redelivered, so no redelivery releases them)
    def all_ran() -> bool:
        sweep(s)
        return len(log.entries()) >= 6

    wait_for(all_ran, 120, "all five followers, long before the lookback")
    ran = log.entries()
    assert ran[0] == "leader" and sorted(ran[1:]) == [f"f{i}" for i in range(5)]
    wait_for(lambda: s.store.stats() == [], 60, "an empty follower table")
    wait_for(lambda: broker_settled(s), 60, "no message left queued or unacked")
    assert Counter(log.entries()) == Counter(["leader", "f0", "f1", "f2", "f3", "f4"])
    s.worker.stop()


@pytest.mark.timeout(600)
def test_chaos_three_sigkills_keep_every_chain_in_causal_order(
    spawn: Callable[..., Spawned],
) -> None:
    # Given 20 chains of 5 sent fully reversed to 2 worker processes with acks_late
    s = spawn(
        CAUSAL_TEST_ACKS_LATE="1",
        CAUSAL_TEST_VISIBILITY_TIMEOUT="4",
        CAUSAL_RELEASE_TIMEOUT="3",
        CAUSAL_TEST_STEP_SLEEP="0.1",
    )
    log = s.log("chaos")
    send_reversed_chains(s, log, chains=20, depth=5)
    # When a worker process is SIGKILLed three times mid-stream (mid-body, mid-park or
    # mid-release) and the pool restarts it; its message comes back (acks_late with
    # task_reject_on_worker_lost). The main process, which holds the broker connection,
    # stays up: killing it can lose a message inside kombu's Redis transport itself.
    for kill in range(3):
        wait_for(lambda n=kill: len(log.entries()) > 10 * (n + 1), 120, f"progress {kill}")
        victim = s.worker.pool_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda v=victim: len(s.worker.pool_pids()) == 2 and v not in s.worker.pool_pids(),
            60,
            "the pool to restart the process",
        )

    # Then, with sweeps republishing what a dead releaser left claimed, every body runs
    def all_ran() -> bool:
        if oldest_claim_age(s) > 3:
            sweep(s)
        return len(set(log.entries())) == 100

    wait_for(all_ran, 300, "all 100 bodies")
    ran = log.entries()
    for c in range(20):
        firsts = [ran.index(f"c{c}:{i}") for i in range(5)]
        assert firsts == sorted(firsts), f"chain {c} out of order: {ran}"
    duplicates = {e: n for e, n in Counter(ran).items() if n > 1}
    print(f"chaos: {len(ran)} body runs for 100 tasks; duplicates: {duplicates or 'none'}")
    s.worker.stop()


@pytest.mark.timeout(300)
def test_terminated_database_connections_mid_stream_lose_nothing(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_TEST_STEP_SLEEP="0.02")
    log = s.log("pgkill")
    send_reversed_chains(s, log, chains=20, depth=5)
    database = s.store.engine.url.database
    for _ in range(3):
        wait_for(lambda: len(log.entries()) >= 5, 60, "progress")
        with s.store.engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            )
        time.sleep(0.2)
    ran = log.wait_len(100, timeout=240)
    assert Counter(ran) == Counter(f"c{c}:{i}" for c in range(20) for i in range(5))
    for c in range(20):
        assert [e for e in ran if e.startswith(f"c{c}:")] == [f"c{c}:{i}" for i in range(5)]


def _leader_fails(s: Spawned, **follower_options: Any) -> tuple[Log, str, Any, Any]:
    """A follower and its own follower parked behind a leader that then fails for good."""
    log, leader = s.log("policy"), f"failing-{uuid.uuid4()}"
    follower = s.handle.step.apply_async((log.name, "follower"), follows=leader, **follower_options)
    grandchild = s.handle.step.apply_async((log.name, "grandchild"), follows=follower)
    wait_for(lambda: sum(x.waiting for x in s.store.stats()) == 2, 60, "parked")
    result = s.handle.broken.apply_async((log.name, "leader"), task_id=leader)
    with pytest.raises(ValueError, match="is broken"):
        result.get(timeout=60)
    return log, leader, follower, grandchild


def test_failed_leader_policy_wait_keeps_followers_parked(
    spawn: Callable[..., Spawned],
) -> None:
    # One pool process: each task starts only once the one before it, including what
    # runs after its tracer (its outcome's record and releases), has finished
    s = spawn("-c", "1")
    log, leader, follower, grandchild = _leader_fails(s)
    # When a follower arrives after the failure, it parks too: under "wait" no failure is
    # recorded, and followers wait for their lookback (then the sweep's release)
    late = s.handle.step.apply_async((log.name, "late"), follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == 2, 60, "the late one parked")
    assert sum(x.waiting for x in s.store.stats()) == 3
    assert s.store.lookup("acc", [leader]).failed == frozenset()
    assert [r.state for r in (follower, grandchild, late)] == ["DEFERRED"] * 3
    assert log.entries() == ["leader"]


def test_failed_leader_policy_release_runs_followers_at_once(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_ON_LEADER_FAILURE="release")
    log, leader, follower, grandchild = _leader_fails(s)
    assert follower.get(timeout=60) == "follower"
    assert grandchild.get(timeout=60) == "grandchild"
    assert log.entries() == ["leader", "follower", "grandchild"]
    # A follower that arrives after the failure runs at once too
    late = s.handle.step.apply_async((log.name, "late"), follows=leader)
    assert late.get(timeout=60) == "late"
    assert log.entries() == ["leader", "follower", "grandchild", "late"]
    assert s.store.stats() == []


@pytest.mark.core
def test_failed_leader_policy_fail_marks_followers_failed(
    spawn: Callable[..., Spawned],
) -> None:
    from celery_causal.errors import LeaderFailed

    s = spawn(CAUSAL_ON_LEADER_FAILURE="fail")
    errback = s.handle.ping.si().set(task_id=f"errback-{uuid.uuid4()}")
    log, leader, follower, grandchild = _leader_fails(s, link_error=errback)
    # Then the follower ends FAILURE with LeaderFailed through Celery's own failure path
    # (its errback runs), without its body running
    with pytest.raises(LeaderFailed, match=leader):
        follower.get(timeout=60)
    assert follower.state == "FAILURE"
    assert s.handle.app.AsyncResult(errback.id).get(timeout=60) == "pong"
    # and records its own failure in turn, so its follower fails because of it
    with pytest.raises(LeaderFailed, match=follower.id):
        grandchild.get(timeout=60)
    # A follower that arrives after the failure fails too, without parking
    late = s.handle.step.apply_async((log.name, "late"), follows=leader)
    with pytest.raises(LeaderFailed, match=leader):
        late.get(timeout=60)
    assert s.store.stats() == []
    assert s.store.lookup("acc", [leader, follower.id, grandchild.id]).failed == {
        leader,
        follower.id,
        grandchild.id,
    }
    assert log.entries() == ["leader"]


def test_ring_of_followers_is_broken_by_the_sweep_after_the_lookback(
    spawn: Callable[..., Spawned],
) -> None:
    # Given two followers that follow each other (producer-chosen ids): each parks behind
    # a leader that is parked itself, so neither is lost
    s = spawn(CAUSAL_LOOKBACK="3", CAUSAL_SEEN_TTL="60")
    log, run = s.log("ring"), uuid.uuid4().hex[:6]
    first, second = f"{run}-a", f"{run}-b"
    base = time.time()
    for label, task_id, leader, offset in [("b", second, first, 2), ("a", first, second, 1)]:
        s.handle.step.apply_async(
            (log.name, label),
            task_id=task_id,
            follows=leader,
            headers={"causal_published_at": base + offset},
        )
    wait_for(lambda: sum(x.waiting for x in s.store.stats()) == 2, 60, "both parked")
    # When a sweep runs before their deadline, the ring stays
    assert sweep(s) == {"released": 0, "refused": 0, "expired_done": 0, "cycles": 0}
    with s.store.engine.connect() as conn:
        due = conn.execute(select(func.max(followers.c.deadline))).scalar()
    assert due is not None
    wait_for(lambda: s.store.clock() > due, 60, "both deadlines passed")
    # Neither is lost (each leader is parked), but status counts the ring as overdue: the
    # next sweep releases its first member
    assert sum(x.overdue for x in s.store.stats()) == 1
    # Then the sweep after the deadline releases the first of the ring (by occurred time),
    # only it, marked as a cycle's release; it runs and releases the other
    report = sweep(s)
    assert (report["cycles"], report["released"]) == (1, 1)
    assert log.wait_len(2) == ["a", "b"]
    released = [
        line.split("released task ")[1]
        for line in s.worker.log_text().splitlines()
        if "released task " in line
    ]
    assert [r.split(" ")[0] for r in released] == [first, second]
    assert released[0].endswith("by cycle") and released[1].endswith("by leader")
    assert s.store.stats() == []


def test_leader_that_fails_twice_then_succeeds_releases_after_the_success(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_ON_LEADER_FAILURE="release")
    log, leader = s.log("flaky"), f"flaky-{uuid.uuid4()}"
    follower = s.handle.step.apply_async((log.name, "follower"), follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == 1, 60, "parked")
    s.handle.flaky.apply_async((log.name, "leader", 2), task_id=leader)
    assert follower.get(timeout=60) == "follower"
    assert log.entries() == ["leader:try0", "leader:try1", "leader:try2", "follower"]


@pytest.mark.timeout(300)
def test_unreachable_database_retries_the_task_through_celery_and_runs_nothing_unordered(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn(CAUSAL_STORE_RETRY_DELAY="0.5", CAUSAL_STORE_RETRY_MAX_DELAY="0.5")
    log, leader = s.log("outage"), f"outage-leader-{uuid.uuid4()}"
    database = s.store.engine.url.database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def allow(ok: bool) -> None:
        with admin.connect() as conn:
            if not ok:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                )
            else:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))

    # Given the database refuses every connection
    allow(False)
    try:
        follower = s.handle.step.apply_async((log.name, "follower"), follows=leader)
        s.handle.step.apply_async((log.name, "leader"), task_id=leader)
        # Then the causal check fails and Celery retries both; no body runs unordered
        wait_for(
            lambda: {follower.id, leader} <= set(s.retried()) and len(s.retried()) >= 4,
            60,
            "retries",
        )
        assert log.entries() == []
    finally:
        allow(True)
        admin.dispose()
    # When the database is back, work continues in order
    assert follower.get(timeout=60) == "follower"
    assert log.entries() == ["leader", "follower"]
    # And each attempt logged one line, naming the leader only for a task that has one
    retried, lines = s.retried(), s.worker.log_text().splitlines()
    for task_id, follows in ((follower.id, f"follows {leader}, "), (leader, "")):
        about = [line for line in lines if task_id in line and f"follows {task_id}" not in line]
        mine = [line for line in about if "causal store" in line]
        assert len(mine) == retried.count(task_id)
        assert all(f"causal store unreachable ({follows}scope 'acc'); retry" in x for x in mine)
    assert not any("follows None" in line for line in lines)


@pytest.mark.timeout(300)
def test_worker_starting_without_its_database_logs_it_and_retries_tasks(
    acceptance_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.acceptance import causal_app

    prefix = f"{acceptance_env['CAUSAL_TEST_PREFIX']}nodb-{uuid.uuid4().hex[:6]}:"
    url = "postgresql+psycopg://causal:hunter2@127.0.0.1:1/nowhere"
    env = dict(
        acceptance_env,
        CAUSAL_STORE_URL=url,
        CAUSAL_TEST_PREFIX=prefix,
        CAUSAL_STORE_RETRY_DELAY="0.5",
        CAUSAL_STORE_RETRY_MAX_DELAY="0.5",
    )
    worker = WorkerProcess(env, tmp_path / "nodb.log", "nodb")
    worker.start()
    try:
        handle = causal_app.create(prefix, store_url=url)
        assert handle.ping.delay().get(timeout=60) == "pong"  # the worker runs
        handle.step.apply_async(("nodb", "x"), follows="someone")
        wait_for(lambda: len(retried(env["CAUSAL_TEST_REDIS_URL"], prefix)) >= 2, 60, "retries")
        text_ = worker.log_text()
        assert "causal store not reachable at worker start" in text_
        assert "hunter2" not in text_ and "causal:***@127.0.0.1:1" in text_
    finally:
        worker.stop()
