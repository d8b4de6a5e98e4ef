"""Causal ordering through real prefork workers (2 processes), Redis and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from celery_causal.sql import SQLStore
from celery_causal.sql.schema import followers
from tests.acceptance.brokers import every_broker
from tests.acceptance.conftest import Log, Spawned, WorkerProcess, recorded
from tests.helpers import wait_for

SEED = {"one": None, "two": "one", "three_a": "two", "three_b": "two"}


def _ids(prefix: str) -> dict[str, str]:
    return {label: f"{prefix}-{label}" for label in SEED}


@pytest.mark.core
@every_broker
@pytest.mark.parametrize(
    "arrival",
    [
        ["one", "two", "three_a", "three_b"],
        ["two", "three_a", "one", "three_b"],
        ["three_b", "three_a", "two", "one"],
    ],
    ids=["proper", "jumbled", "backwards"],
)
def test_seed_events_respect_causal_order(
    worker: WorkerProcess, causal_app: Any, log: Log, arrival: list[str]
) -> None:
    ids = _ids(uuid.uuid4().hex[:8])
    base = time.time()
    for label in arrival:
        leader = SEED[label]
        causal_app.step.apply_async(
            (log.name, label),
            task_id=ids[label],
            follows=ids[leader] if leader else None,
            headers={"causal_published_at": base + list(SEED).index(label)},
        )
    ran = log.wait_len(4)
    assert sorted(ran) == sorted(SEED)
    # Siblings three_a and three_b may run at once on the two processes; every
    # leader runs before its followers.
    assert ran.index("one") < ran.index("two") < min(ran.index("three_a"), ran.index("three_b"))


def test_an_old_follower_still_waits_for_its_leader(spawn: Callable[..., Spawned]) -> None:
    # Given a worker whose lookback (2s) is shorter than the age of each follower on arrival
    s = spawn(CAUSAL_LOOKBACK="2", CAUSAL_SEEN_TTL="60")
    log, run = s.log("old"), uuid.uuid4().hex[:6]
    leader, day_old, delayed = f"{run}-leader", f"{run}-day-old", f"{run}-delayed"
    # When one follower says it was published a day ago, and another is held back by a
    # countdown longer than the lookback
    sent = time.time()
    old = s.handle.step.apply_async(
        (log.name, "day_old"),
        task_id=day_old,
        follows=leader,
        headers={"causal_published_at": sent - 86400},
    )
    late = s.handle.step.apply_async(
        (log.name, "delayed"), task_id=delayed, follows=leader, countdown=3
    )
    # Then both park, however old: the wait counts from the park, on the store's clock
    wait_for(lambda: s.store.count_followers("acc", leader) == 2, 60, "both parked")
    with s.store.engine.connect() as conn:
        rows = {
            r.follower_id: r
            for r in conn.execute(
                select(
                    followers.c.follower_id,
                    followers.c.occurred_at,
                    followers.c.parked_at,
                    followers.c.deadline,
                )
            )
        }
    assert set(rows) == {day_old, delayed}
    for row in rows.values():
        assert row.deadline - row.parked_at == pytest.approx(2.0)
    assert rows[day_old].parked_at - rows[day_old].occurred_at > 86000
    assert rows[delayed].parked_at - rows[delayed].occurred_at >= 2.0  # older than lookback
    assert log.entries() == []
    assert old.state == late.state == "DEFERRED"
    # When the leader comes, it releases them: neither overtook it
    s.handle.step.apply_async((log.name, "leader"), task_id=leader)
    assert old.get(timeout=60) == "day_old" and late.get(timeout=60) == "delayed"
    ran = log.entries()
    assert ran[0] == "leader" and sorted(ran[1:]) == ["day_old", "delayed"]
    assert s.store.stats() == []


def test_two_scopes_do_not_interfere(
    worker: WorkerProcess, causal_app: Any, log: Log, pg_store: SQLStore
) -> None:
    leader = f"leader-{uuid.uuid4()}"
    other = causal_app.other_scope_step.apply_async((log.name, "other"), follows=leader)
    same = causal_app.step.apply_async((log.name, "same"), follows=leader)
    wait_for(
        lambda: (
            pg_store.count_followers("acc", leader) == 1
            and pg_store.count_followers("acc-other", leader) == 1
        ),
        60,
        "both parked",
    )
    causal_app.step.apply_async((log.name, "leader"), task_id=leader)
    assert same.get(timeout=60) == "same"
    assert log.entries() == ["leader", "same"]
    assert pg_store.count_followers("acc-other", leader) == 1
    assert other.state == "DEFERRED"
    info = other.info  # what it waits for, since when, and when the sweep releases it
    assert (info["follows"], info["scope"]) == (leader, "acc-other")
    assert {"parked_at", "sweep_releases_at", "result"} <= set(info)


@every_broker
def test_fifty_reversed_chains_of_five_run_in_order(
    worker: WorkerProcess, causal_app: Any, log: Log, pg_store: SQLStore
) -> None:
    run = uuid.uuid4().hex[:8]
    for c in range(50):
        for i in range(4, -1, -1):
            causal_app.step.apply_async(
                (log.name, f"c{c}:{i}"),
                task_id=f"{run}-c{c}-{i}",
                follows=f"{run}-c{c}-{i - 1}" if i else None,
            )
    ran = log.wait_len(250, timeout=180)
    assert Counter(ran) == Counter(f"c{c}:{i}" for c in range(50) for i in range(5))
    for c in range(50):
        steps = [int(e.split(":")[1]) for e in ran if e.startswith(f"c{c}:")]
        assert steps == [0, 1, 2, 3, 4], f"chain {c} ran as {steps}"
    assert sum(s.waiting + s.releasing for s in pg_store.stats()) == 0


@pytest.mark.core
@every_broker
def test_a_parked_follower_starts_only_once_it_is_released(
    worker: WorkerProcess, causal_app: Any, log: Log, pg_store: SQLStore
) -> None:
    # Given a follower parked in a prefork pool process before its leader came
    run = uuid.uuid4().hex[:8]
    leader, follower = f"{run}-leader", f"{run}-follower"
    causal_app.step.apply_async((log.name, "follower"), task_id=follower, follows=leader)
    wait_for(lambda: pg_store.count_followers("acc", leader) == 1, 60, "follower parked")
    # When the leader runs and releases it
    causal_app.step.apply_async((log.name, "leader"), task_id=leader)
    assert log.wait_len(2) == ["leader", "follower"]
    # Then Celery started the follower's body once, for its released delivery: the parked
    # delivery ended before Celery's tracer (no task_prerun, no exception info)
    started = [e.decode() for e in log.client.lrange(causal_app.prefix + "started", 0, -1)]
    assert started.count(follower) == 1
    assert started.count(leader) == 1


@pytest.mark.timeout(400)
def test_one_leader_releases_a_thousand_followers_exactly_once(
    worker: WorkerProcess, causal_app: Any, log: Log, pg_store: SQLStore
) -> None:
    leader = f"big-leader-{uuid.uuid4()}"
    with causal_app.app.producer_or_acquire() as producer:
        for i in range(1000):
            causal_app.step.apply_async((log.name, f"f{i}"), follows=leader, producer=producer)
    wait_for(lambda: pg_store.count_followers("acc", leader) == 1000, 180, "1000 parked")
    assert log.entries() == []
    causal_app.step.apply_async((log.name, "leader"), task_id=leader)
    ran = log.wait_len(1001, timeout=180)
    assert ran[0] == "leader"
    assert Counter(ran[1:]) == Counter(f"f{i}" for i in range(1000))
    wait_for(lambda: not pg_store.stats(), 30, "follower table empty")


@pytest.mark.core
@every_broker
def test_async_result_of_a_parked_follower_returns_its_value(
    worker: WorkerProcess, causal_app: Any, log: Log, pg_store: SQLStore
) -> None:
    leader = causal_app.step.AsyncResult(f"leader-{uuid.uuid4()}")
    follower = causal_app.step.s(log.name, "follower").set(follows=leader).delay()
    wait_for(lambda: pg_store.count_followers("acc", leader.id) == 1, 60, "parked")
    assert follower.state == "DEFERRED"
    causal_app.step.apply_async((log.name, "leader"), task_id=leader.id)
    assert follower.get(timeout=60) == "follower"
    assert log.entries() == ["leader", "follower"]


@pytest.mark.core
def test_duplicate_deliveries_run_no_body_twice(
    worker: WorkerProcess,
    causal_app: Any,
    log: Log,
    pg_store: SQLStore,
    acceptance_env: dict[str, str],
) -> None:
    def seen(what: str) -> list[str]:  # the worker's hooks on celery_causal's signals
        return recorded(acceptance_env["CAUSAL_TEST_REDIS_URL"], causal_app.prefix, what)

    leader, fid = f"dup-leader-{uuid.uuid4()}", f"dup-follower-{uuid.uuid4()}"
    # Given a parked follower delivered twice
    for _ in range(2):
        causal_app.step.apply_async((log.name, "follower"), task_id=fid, follows=leader)
    wait_for(
        lambda: seen("parked").count(fid) == 2,
        60,
        "both copies handled",
    )
    assert pg_store.count_followers("acc", leader) == 1
    # When the leader runs, and then the finished leader and follower are delivered again
    causal_app.step.apply_async((log.name, "leader"), task_id=leader).get(timeout=60)
    causal_app.step.AsyncResult(fid).get(timeout=60)
    causal_app.step.apply_async((log.name, "leader"), task_id=leader)
    causal_app.step.apply_async((log.name, "follower"), task_id=fid, follows=leader)
    wait_for(
        lambda: seen("skipped").count(leader) == 1 and seen("skipped").count(fid) == 1,
        60,
        "duplicates skipped",
    )
    # Then each body ran once
    assert log.entries() == ["leader", "follower"]


def test_worker_with_a_wrong_setting_stops_with_an_error_naming_it(
    acceptance_env: dict[str, str], tmp_path: Any
) -> None:
    import subprocess
    import sys

    from tests.acceptance.conftest import ROOT

    env = dict(acceptance_env, CAUSAL_LOOKBACK="-5")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.acceptance.causal_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "causal_lookback: Input should be greater than 0" in proc.stderr + proc.stdout
