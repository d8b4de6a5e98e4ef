"""Edges of causal ordering, with real prefork workers, Redis and PostgreSQL.

A follower's wait counts from its park, on the store's clock, with the lookback of the app
that parked it; followers are released only once their leader's tracer finished; a leader
that fails for good under "fail" fails its followers through Celery's own failure path;
the depth guard and rings of followers are resolved by the next sweep. Each test starts
workers of its own (own database, own Redis key prefix) and waits on conditions.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from celery import chord
from celery.exceptions import ChordError
from sqlalchemy import create_engine, func, select, text

from celery_causal import LeaderFailed
from celery_causal.sql.schema import followers
from tests.acceptance import causal_app
from tests.acceptance.conftest import CeleryProcess, Log, Spawned, WorkerProcess
from tests.conftest import PG_ADMIN_URL
from tests.helpers import wait_for


@contextmanager
def beat(env: dict[str, str], log_dir: Path, name: str = "beat") -> Iterator[CeleryProcess]:
    """Celery beat for the app configured by ``env``: it sends the sweep every interval."""
    proc = CeleryProcess(
        env,
        log_dir / f"{name}.log",
        ["beat", "-l", "info", "-s", str(log_dir / f"{name}-schedule"), "--max-interval", "1"],
    )
    proc.start()
    try:
        yield proc
    except BaseException:
        print(f"--- {name} log ---\n{proc.log_text()}")
        raise
    finally:
        proc.stop()


def waiting(s: Spawned) -> int:
    """Followers parked and not claimed, in the spawned worker's database."""
    stmt = select(func.count()).where(followers.c.claimed_at.is_(None))
    with s.store.engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def parked_at(s: Spawned, follower_id: str) -> float:
    stmt = select(followers.c.parked_at).where(followers.c.follower_id == follower_id)
    with s.store.engine.connect() as conn:
        return float(conn.execute(stmt).scalar_one())


def released_lines(worker: WorkerProcess) -> list[str]:
    """Each release the worker logged, as "<task id> by <leader|sweep|cycle|operator>"."""
    return [
        line.split("released task ")[1].split(" (")[0] + " by " + line.rsplit(" by ", 1)[1]
        for line in worker.log_text().splitlines()
        if "released task " in line
    ]


def logged(log: Log, prefix: str) -> Callable[[], bool]:
    """A condition: ``log`` has an entry starting with ``prefix``."""
    return lambda: any(e.startswith(prefix) for e in log.entries())


def sweeps_done(worker: WorkerProcess) -> int:
    return worker.log_text().count("Task celery_causal.sweep[")


def chain_ids(run: str, c: int, i: int) -> str:
    return f"{run}-c{c}-{i}"


def send_reversed_chains(s: Spawned, log: Log, run: str, chains: range, depth: int) -> None:
    """Chains c<n>:0 <- c<n>:1 <- ... sent fully reversed; bodies log "c<n>:<step>"."""
    for c in chains:
        for i in range(depth - 1, -1, -1):
            s.handle.step.apply_async(
                (log.name, f"c{c}:{i}"),
                task_id=chain_ids(run, c, i),
                follows=chain_ids(run, c, i - 1) if i else None,
            )


@pytest.mark.timeout(240)
def test_store_outage_longer_than_the_lookback_breaks_no_chain(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a worker with a 3 s lookback and no sweep, and ten reversed chains of 5 whose
    # followers are parked, waiting for their first task
    lookback = 3.0
    s = spawn(
        CAUSAL_LOOKBACK=str(lookback),
        CAUSAL_SEEN_TTL="60",
        CAUSAL_STORE_RETRY_DELAY="0.5",
        CAUSAL_STORE_RETRY_MAX_DELAY="0.5",
        CAUSAL_TEST_STEP_SLEEP="0.02",
    )
    log, run = s.log("outage"), uuid.uuid4().hex[:6]
    chains, depth = 20, 5
    for c in range(10):
        for i in range(depth - 1, 0, -1):
            s.handle.step.apply_async(
                (log.name, f"c{c}:{i}"),
                task_id=chain_ids(run, c, i),
                follows=chain_ids(run, c, i - 1),
            )
    wait_for(lambda: waiting(s) == 10 * (depth - 1), 60, "the first ten chains parked")
    database = s.store.engine.url.database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    # When the database refuses every connection for twice the lookback, while ten more
    # reversed chains and the first tasks of the parked ones are sent. (No body runs during
    # the outage: each causal task's check needs the store. A body that ran just before
    # one would retry its record for a few seconds, then leave its followers to a sweep.)
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": database},
        )
    cut = time.monotonic()
    try:
        send_reversed_chains(s, log, run, range(10, chains), depth)
        for c in range(10):
            s.handle.step.apply_async((log.name, f"c{c}:0"), task_id=chain_ids(run, c, 0))
        wait_for(
            lambda: time.monotonic() - cut >= 2 * lookback and len(s.retried()) >= 60,
            60,
            "an outage of twice the lookback, with causal tasks retrying through Celery",
        )
        assert log.entries() == []
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        admin.dispose()
        s.store.engine.dispose()  # the test's own pooled connections were terminated
    # Then every body runs once the store is back, each chain in causal order: followers
    # sent during the outage arrive older than the lookback and still wait for their leader
    ran = log.wait_len(chains * depth, timeout=120)
    assert Counter(ran) == Counter(f"c{c}:{i}" for c in range(chains) for i in range(depth))
    for c in range(chains):
        assert [e for e in ran if e.startswith(f"c{c}:")] == [f"c{c}:{i}" for i in range(depth)]
    worker_log = s.worker.log_text()
    assert any(
        f"parked task {chain_ids(run, c, i)}:" in worker_log
        for c in range(10, chains)
        for i in range(1, depth)
    )
    wait_for(lambda: waiting(s) == 0, 60, "no follower left parked")


def test_follower_with_a_countdown_longer_than_the_lookback_waits_for_its_leader(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a 2 s lookback, two followers held back longer than that (a countdown, an
    # eta), and their leader held back longer still
    s = spawn(CAUSAL_LOOKBACK="2", CAUSAL_SEEN_TTL="60")
    log, leader = s.log("countdown"), f"countdown-leader-{uuid.uuid4()}"
    by_countdown = s.handle.step.apply_async((log.name, "countdown"), follows=leader, countdown=3)
    by_eta = s.handle.step.apply_async(
        (log.name, "eta"), follows=leader, eta=datetime.now(timezone.utc) + timedelta(seconds=3)
    )
    s.handle.step.apply_async((log.name, "leader"), task_id=leader, countdown=6)
    # When they arrive, older than the lookback, before their leader
    wait_for(lambda: s.store.count_followers("acc", leader) == 2, 60, "both parked")
    assert log.entries() == []
    # Then they park and run only once their leader ran
    assert by_countdown.get(timeout=60) == "countdown"
    assert by_eta.get(timeout=60) == "eta"
    ran = log.entries()
    assert ran[0] == "leader" and sorted(ran[1:]) == ["countdown", "eta"]


@pytest.mark.timeout(180)
def test_chain_deeper_than_max_depth_completes_through_the_next_sweeps(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    # Given causal_max_depth=2, a lookback of 300 s, and beat sweeping every second
    max_depth, lookback = 2, 300
    s = spawn(
        CAUSAL_MAX_DEPTH=str(max_depth),
        CAUSAL_LOOKBACK=str(lookback),
        CAUSAL_SEEN_TTL="600",
        CAUSAL_SWEEP_INTERVAL="1",
    )
    log, run = s.log("deep"), uuid.uuid4().hex[:6]
    length = 3 * max_depth + 1
    with beat(s.env, tmp_path):
        # When a chain of 7 arrives reversed: every follower parks before its first task
        for i in range(length - 1, 0, -1):
            s.handle.step.apply_async(
                (log.name, f"s{i}"), task_id=chain_ids(run, 0, i), follows=chain_ids(run, 0, i - 1)
            )
        wait_for(lambda: waiting(s) == length - 1, 60, "the chain parked")
        s.handle.step.apply_async((log.name, "s0"), task_id=chain_ids(run, 0, 0))
        # Then it runs in order, long before one lookback: each time the guard stops the
        # cascade, the next sweep releases the rest
        ran = log.wait_len(length, timeout=lookback / 5)
    assert ran == [f"s{i}" for i in range(length)]
    assert s.worker.log_text().count("depth exceeded: 1 follower(s)") == 2
    by_sweep = [r for r in released_lines(s.worker) if r.endswith(" by sweep")]
    assert by_sweep == [
        f"{chain_ids(run, 0, max_depth + 1)} by sweep",
        f"{chain_ids(run, 0, 2 * max_depth + 2)} by sweep",
    ]
    assert waiting(s) == 0


@pytest.mark.timeout(180)
def test_fail_policy_fails_every_follower_through_celery(spawn: Callable[..., Spawned]) -> None:
    # Given causal_on_leader_failure="fail", and parked behind a leader that will fail:
    # two followers (one with an errback), a grandchild, and a chord whose header holds
    # a follower of that leader and an independent task
    s = spawn(CAUSAL_ON_LEADER_FAILURE="fail")
    log, leader = s.log("fail"), f"failing-{uuid.uuid4()}"
    step = s.handle.step
    errback = s.handle.ping.si().set(task_id=f"errback-{uuid.uuid4()}")
    first = step.apply_async((log.name, "first"), follows=leader, link_error=errback)
    second = step.apply_async((log.name, "second"), follows=leader)
    grandchild = step.apply_async((log.name, "grandchild"), follows=first)
    in_chord = f"in-chord-{uuid.uuid4()}"
    joined = chord(
        [
            step.s(log.name, "in_chord").set(follows=leader, task_id=in_chord),
            step.s(log.name, "independent"),
        ]
    )(step.si(log.name, "chord_callback"))
    wait_for(lambda: waiting(s) == 4, 60, "four followers parked")
    wait_for(lambda: "independent" in log.entries(), 60, "the independent header task")
    # When the leader fails for good
    with pytest.raises(ValueError, match="is broken"):
        s.handle.broken.apply_async((log.name, "leader"), task_id=leader).get(timeout=60)
    # Then each follower ends FAILURE with LeaderFailed, through Celery's tracer
    for result in (first, second, step.AsyncResult(in_chord)):
        with pytest.raises(LeaderFailed, match=leader):
            result.get(timeout=60)
        assert result.state == "FAILURE"
    # and a failed follower records its own failure: its follower fails in turn
    with pytest.raises(LeaderFailed, match=first.id):
        grandchild.get(timeout=60)
    # its errback ran
    assert s.handle.app.AsyncResult(errback.id).get(timeout=60) == "pong"
    # and the chord fails instead of staying PENDING: its callback never runs, and its
    # result (read without its parents, whose failure get() would raise at once) holds
    # the header's error, or a ChordError naming it
    chord_result = s.handle.app.AsyncResult(joined.id)
    with pytest.raises((ChordError, LeaderFailed), match=in_chord):
        chord_result.get(timeout=60)
    assert chord_result.state == "FAILURE"
    # Followers that arrive after the failures fail too, without parking
    late = step.apply_async((log.name, "late"), follows=leader)
    late_grandchild = step.apply_async((log.name, "late_grandchild"), follows=second)
    with pytest.raises(LeaderFailed, match=leader):
        late.get(timeout=60)
    with pytest.raises(LeaderFailed, match=second.id):
        late_grandchild.get(timeout=60)
    # No follower's body ran, nor the chord's callback
    assert sorted(log.entries()) == ["independent", "leader"]
    assert waiting(s) == 0


@pytest.mark.timeout(180)
def test_each_parked_follower_waits_the_lookback_of_the_app_that_parked_it(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    # Given two apps on one store, each with its own broker prefix and worker: "slow" with
    # a 600 s lookback, "quick" with 2 s, whose beat sweeps every second
    slow = spawn(CAUSAL_LOOKBACK="600", CAUSAL_SEEN_TTL="1200")
    quick_prefix = slow.handle.prefix + "quick:"
    quick_env = dict(
        slow.env,
        CAUSAL_TEST_PREFIX=quick_prefix,
        CAUSAL_LOOKBACK="2",
        CAUSAL_SEEN_TTL="60",
        CAUSAL_SWEEP_INTERVAL="1",
    )
    quick_worker = WorkerProcess(quick_env, tmp_path / "quick-worker.log", "quick")
    quick_worker.start()
    try:
        quick = Spawned(
            quick_worker,
            causal_app.create(quick_prefix, store_url=slow.env["CAUSAL_STORE_URL"]),
            slow.store,
            quick_env,
            tmp_path,
        )
        quick.wait_ready()
        slow_log, quick_log = slow.log("slow"), quick.log("quick")
        run = uuid.uuid4().hex[:6]
        slow_leader, quick_leader = f"{run}-slow-leader", f"{run}-quick-leader"
        slow_follower = slow.handle.step.apply_async(
            (slow_log.name, "slow_follower"), task_id=f"{run}-slow", follows=slow_leader
        )
        quick_follower = quick.handle.step.apply_async(
            (quick_log.name, "quick_follower"), task_id=f"{run}-quick", follows=quick_leader
        )
        wait_for(
            lambda: (
                slow.store.count_followers("acc", slow_leader) == 1
                and slow.store.count_followers("acc", quick_leader) == 1
            ),
            60,
            "both parked, each by its own app",
        )
        since = parked_at(slow, slow_follower.id) + 10
        with beat(quick_env, tmp_path, "quick-beat"):
            # When the quick app's sweeps run: its own follower is released after its 2 s
            assert quick_follower.get(timeout=60) == "quick_follower"
            # Then, 10 s after its park and with more sweeps done, the slow app's follower
            # still waits for its leader
            wait_for(lambda: slow.store.clock() > since, 60, "10 s since the slow park")
            sweeps = sweeps_done(quick_worker)
            wait_for(lambda: sweeps_done(quick_worker) >= sweeps + 2, 60, "two more sweeps")
            assert slow.store.count_followers("acc", slow_leader) == 1
            assert slow_follower.state == "DEFERRED"
        assert quick_log.entries() == ["quick_follower"]
        assert [r.split(" by ")[0] for r in released_lines(quick_worker)] == [quick_follower.id]
        # When its leader comes, it runs after it
        slow.handle.step.apply_async((slow_log.name, "slow_leader"), task_id=slow_leader)
        assert slow_follower.get(timeout=60) == "slow_follower"
        assert slow_log.entries() == ["slow_leader", "slow_follower"]
    finally:
        quick_worker.stop()


@pytest.mark.timeout(180)
def test_ring_of_two_and_a_follower_behind_it_all_run_with_beat(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    # Given A follows B and B follows A (producer-chosen ids), and C follows A
    s = spawn(CAUSAL_LOOKBACK="3", CAUSAL_SEEN_TTL="60", CAUSAL_SWEEP_INTERVAL="1")
    log, run = s.log("ring"), uuid.uuid4().hex[:6]
    a, b, c = f"{run}-a", f"{run}-b", f"{run}-c"
    base = time.time()
    results = {}
    for label, task_id, leader, offset in [("c", c, a, 3), ("b", b, a, 2), ("a", a, b, 1)]:
        results[label] = s.handle.step.apply_async(
            (log.name, label),
            task_id=task_id,
            follows=leader,
            headers={"causal_published_at": base + offset},
        )
    wait_for(lambda: waiting(s) == 3, 60, "all three parked")
    # When beat runs the sweep every second
    with beat(s.env, tmp_path):
        ran = log.wait_len(3, timeout=60)
    # Then after their deadline the first of the ring (A, by occurred time) is released,
    # and it releases B and C: all three ran, C after A
    assert ran[0] == "a" and sorted(ran[1:]) == ["b", "c"]
    assert {label: r.get(timeout=60) for label, r in results.items()} == {
        "a": "a",
        "b": "b",
        "c": "c",
    }
    released = released_lines(s.worker)
    assert released[0] == f"{a} by cycle"
    assert sorted(released[1:]) == [f"{b} by leader", f"{c} by leader"]
    wait_for(lambda: waiting(s) == 0, 30, "no follower left parked")


def test_released_follower_sees_its_leader_succeeded(spawn: Callable[..., Spawned]) -> None:
    # Given 20 followers parked, each reading its own leader's state when its body runs
    s = spawn(CAUSAL_TEST_SLOW_SEND="0.3")
    log, run = s.log("state"), uuid.uuid4().hex[:6]
    pairs = 20
    for i in range(pairs):
        s.handle.observe.apply_async(
            (log.name, f"f{i}", f"{run}-l{i}"), task_id=f"{run}-f{i}", follows=f"{run}-l{i}"
        )
    wait_for(lambda: waiting(s) == pairs, 60, "all followers parked")
    # When their leaders run one after another, so that a released follower finds a free
    # pool process at once; half of them send a link callback that is slow to send,
    # between the end of their body and the SUCCESS Celery stores after it
    for i in range(pairs):
        link = s.handle.slow_to_send.si() if i % 2 == 0 else None
        s.handle.step.apply_async((log.name, f"l{i}"), task_id=f"{run}-l{i}", link=link)
        wait_for(logged(log, f"f{i}:"), 60, f"follower {i}")
    # Then every follower saw its leader's SUCCESS: it was released after the tracer
    ran = log.entries()
    assert ran == [entry for i in range(pairs) for entry in (f"l{i}", f"f{i}:SUCCESS")]
