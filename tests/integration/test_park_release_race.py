"""The park/release race (the seed's flaw #20381), forced with threads on every store.

A follower checks "leader not done"; meanwhile the leader, on another worker, records
itself done and claims its followers. Whichever order the steps take, the follower must
run exactly once and promptly: either its park takes the row back (LEADER_DONE) or the
leader's claim publishes it. Never both, never neither (stranded until the sweep).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psycopg
import pytest
from sqlalchemy import text

from celery_causal.sql import SQLStore, open_store
from celery_causal.sql.postgresql import FINISH, PARK
from celery_causal.store import CausalStore, ClaimedFollower, DoneRecord, ParkOutcome
from tests.helpers import follower

TTL = 1800.0
LOOKBACK = 60.0


def leader_claims(store: CausalStore, leader: str, limit: int = 100) -> list[ClaimedFollower]:
    """What the runtime claims when ``leader`` succeeds: with its done record, then more."""
    record = store.record_done_and_claim("default", leader, limit)
    claimed = list(record.claimed)
    if record.waited and not record.complete:
        claimed += store.claim_followers("default", leader, limit)
    return claimed


def _run_pair(store: CausalStore, fid: str, leader: str, order: list[str]) -> Counter[str]:
    """Run follower and leader on two threads; ``order`` forces where they interleave."""
    runs: Counter[str] = Counter()
    follower_checked = threading.Event()
    leader_finished = threading.Event()
    follower_parked = threading.Event()

    def follower_side() -> None:
        if leader in store.lookup("default", [leader]).done:
            runs[fid] += 1
            return
        follower_checked.set()
        if order == ["check", "leader", "park"]:
            assert leader_finished.wait(10)
        if store.park(follower(fid, leader), LOOKBACK) is ParkOutcome.LEADER_DONE:
            runs[fid] += 1
        follower_parked.set()

    def leader_side() -> None:
        assert follower_checked.wait(10)
        if order == ["check", "park", "leader"]:
            assert follower_parked.wait(10)
        for claimed in leader_claims(store, leader):
            runs[claimed.follower_id] += 1
            store.finish([claimed])
        leader_finished.set()

    threads = [threading.Thread(target=follower_side), threading.Thread(target=leader_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return runs


@pytest.mark.parametrize(
    "order",
    [["check", "leader", "park"], ["check", "park", "leader"]],
    ids=["leader-completes-between-check-and-park", "follower-parks-before-leader"],
)
def test_each_interleaving_runs_the_follower_exactly_once(
    store: CausalStore, order: list[str]
) -> None:
    runs = _run_pair(store, "f1", "L", order)
    assert runs == {"f1": 1}
    assert store.count_followers("default", "L") == 0  # nothing left for the sweep


@pytest.mark.timeout(180)
def test_racing_pairs_released_through_a_barrier(store: CausalStore) -> None:
    # Given 60 leader/follower pairs whose two sides start together on 8 threads
    pairs = [(f"f{i}", f"L{i}") for i in range(60)]
    steps = [("follow", f, leader) for f, leader in pairs] + [
        ("lead", f, leader) for f, leader in pairs
    ]
    random.Random(7).shuffle(steps)
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(my_steps: list[tuple[str, str, str]]) -> None:
        barrier.wait()
        for kind, fid, leader in my_steps:
            if kind == "lead":
                for claimed in leader_claims(store, leader):
                    store.finish([claimed])
                    with lock:
                        runs[claimed.follower_id] += 1
            elif leader in store.lookup("default", [leader]).done or (
                store.park(follower(fid, leader), LOOKBACK) is ParkOutcome.LEADER_DONE
            ):
                with lock:
                    runs[fid] += 1

    threads = [threading.Thread(target=worker, args=(steps[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Then every follower ran exactly once and none waits for the sweep
    assert runs == {f: 1 for f, _ in pairs}
    assert sum(s.waiting + s.releasing for s in store.stats()) == 0


@pytest.mark.timeout(60)
def test_a_park_committed_while_the_done_record_waits_is_not_missed(
    pg_store: SQLStore, pg_url: str
) -> None:
    # PostgreSQL claims with the done record, in the snapshot the statement took before it
    # waited for the leader's row: a park that commits during that wait is not in it.
    compiled = pg_store._db.compile(PARK)
    parked_row = follower("f1", "L")
    values = {
        "b_scope": "default",
        "b_follower": "f1",
        "b_leader": "L",
        "b_task": parked_row.task_name,
        "b_occurred": parked_row.occurred_at,
        "b_ctype": parked_row.content_type,
        "b_cenc": parked_row.content_encoding,
        "b_payload": parked_row.payload,
        "b_host": "",
        "b_ttl": TTL,
        "b_lookback": LOOKBACK,
    }
    park_conn = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"))
    try:
        # Given a follower whose park holds the leader's row, its transaction still open
        compiled.execute(park_conn, values)
        park_pid = park_conn.info.backend_pid
        # When the leader records done and claims meanwhile (it waits for that row)
        outcome: list[DoneRecord] = []
        leader = threading.Thread(
            target=lambda: outcome.append(pg_store.record_done_and_claim("default", "L", 100))
        )
        leader.start()
        waiting_on_park = (
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> %s "
            "AND %s = ANY(pg_blocking_pids(pid))"
        )
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as probe:
            for _ in range(500):
                row = probe.execute(waiting_on_park, (park_pid, park_pid)).fetchone()
                if row is not None and row[0]:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the done record never waited for the park's lock")
        # and the park commits while the record waits
        park_conn.commit()
        leader.join(20)
    finally:
        park_conn.close()
    # Then the record either claimed the follower or says it must claim again
    (record,) = outcome
    assert record.waited
    later = [] if record.complete else pg_store.claim_followers("default", "L", 100)
    assert [f.follower_id for f in record.claimed + later] == ["f1"]
    assert not record.complete  # the snapshot predates the park: the claim is repeated


def test_every_mark_moves_the_leaders_row_forward_even_when_the_clock_does_not(
    pg_store: SQLStore,
) -> None:
    # The done record learns that a park committed during its lock wait by comparing
    # waited_at in its snapshot with the latest; a mark must never leave it unchanged.
    pg_store.park(follower("f1", "L"), LOOKBACK)
    ahead = pg_store.clock() + 3600.0  # as if the next park read an equal or earlier clock
    with pg_store.engine.begin() as conn:
        conn.execute(text("UPDATE causal_done SET waited_at = :w"), {"w": ahead})
    pg_store.park(follower("f2", "L"), LOOKBACK)
    with pg_store.engine.connect() as conn:
        (waited_at,) = conn.execute(text("SELECT waited_at FROM causal_done")).one()
    assert waited_at > ahead


@pytest.mark.timeout(60)
def test_a_release_in_flight_never_hides_a_waiting_row_from_the_next_leader(
    pg_store: SQLStore,
    pg_url: str,
) -> None:
    # A chain L <- f1 <- f2, both followers parked. L's worker releases f1: it publishes
    # f1, then deletes f1's row. f1 can run on another worker before that delete commits;
    # its claim skips rows another transaction holds locked, so the release must not hold
    # f2's row locked, or f1's claim misses f2 and f2 waits for the sweep.
    pg_store.park(follower("f1", "L", occurred_at=1.0), LOOKBACK)
    pg_store.park(follower("f2", "f1", occurred_at=2.0), LOOKBACK)
    (first,) = leader_claims(pg_store, "L")
    assert first.follower_id == "f1"
    finish = pg_store._db.compile(FINISH)
    release_conn = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"))
    try:
        # Given L's release of f1 deleting its row, the transaction not yet committed
        finish.execute(release_conn, {"b_ids": [first.row_id]})
        # When f1, already published and run elsewhere, records done and claims
        claimed = leader_claims(pg_store, "f1")
        release_conn.commit()
    finally:
        release_conn.close()
    # Then f1's claim found f2: nothing waits for the sweep
    assert [f.follower_id for f in claimed] == ["f2"]


@pytest.mark.timeout(180)
def test_the_handshake_holds_on_a_server_whose_default_is_repeatable_read() -> None:
    from tests.conftest import fresh_database

    with fresh_database("_rr") as url:
        # Given a database whose default isolation is REPEATABLE READ
        admin = open_store(url, create_schema=False)
        with admin.engine.connect() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar_one()
            conn.execute(
                text(
                    f'ALTER DATABASE "{name}" '
                    "SET default_transaction_isolation = 'repeatable read'"
                )
            )
        admin.close()
        store = open_store(url)
        try:
            # Then the store's own connections still run READ COMMITTED
            with store.engine.connect() as conn:
                isolation = conn.execute(text("SHOW transaction_isolation")).scalar_one()
            assert isolation == "read committed"
            # and racing pairs each run their follower once, with no serialization error
            test_racing_pairs_released_through_a_barrier(store)
        finally:
            store.close()
