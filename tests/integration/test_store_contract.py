"""The storage contract, run against every store (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from celery_causal.sql import SQLStore, open_store
from celery_causal.store import CausalStore, ParkOutcome
from tests.helpers import age, follower, truncate

TTL = 1800.0
LOOKBACK = 60.0


def test_parking_twice_leaves_one_row(store: CausalStore) -> None:
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.PARKED
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.PARKED
    assert store.count_followers("default", "L") == 1
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f1"]


def test_a_store_with_its_schema_misses_no_table(store: CausalStore) -> None:
    assert store.missing_tables() == []


def test_a_store_that_may_not_create_the_schema_reports_it_missing_and_creates_no_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "typo.sqlite3"
    sql = open_store(f"sqlite:///{path}", create_schema=False)
    try:
        assert sql.missing_tables() == [
            "causal_dead_followers",
            "causal_done",
            "causal_followers",
            "causal_key_sends",
            "causal_keys",
            "causal_scope_counts",
        ]
        assert not path.exists()
        sql.create_schema()
        assert sql.missing_tables() == []
    finally:
        sql.close()


def test_lookup_reports_done_ids_within_the_ttl(store: CausalStore) -> None:
    store.record_done("default", "a", seen_ttl=50)
    store.record_done("default", "b", seen_ttl=200)
    result = store.lookup("default", ["a", "b", "c"])
    assert result.done == {"a", "b"}
    assert result.now > 1_600_000_000  # an epoch-seconds clock
    age(store, 100)
    assert store.lookup("default", ["a", "b"]).done == {"b"}


def test_record_done_again_refreshes_an_expired_record(store: CausalStore) -> None:
    store.record_done("default", "a", seen_ttl=50)
    age(store, 100)
    store.record_done("default", "a", seen_ttl=50)
    assert store.lookup("default", ["a"]).done == {"a"}


def test_each_record_keeps_the_ttl_of_the_app_that_made_it(store: CausalStore) -> None:
    # Given an app keeping records an hour and one keeping them two minutes, on one store
    store.record_done("default", "long", seen_ttl=3600)
    store.record_done("default", "short", seen_ttl=120)
    age(store, 200)
    # When the short-lived app's sweep expires records
    assert store.expire_done(seen_ttl=120, limit=100) == 1
    # Then the long-lived app's record still answers, for every reader
    assert store.lookup("default", ["long", "short"]).done == {"long"}
    assert store.park(follower("f", "long"), LOOKBACK) is ParkOutcome.LEADER_DONE


def test_followers_are_claimed_in_occurred_order_ties_by_id(store: CausalStore) -> None:
    for fid, occurred in [("c", 3.0), ("b2", 2.0), ("a", 1.0), ("b1", 2.0)]:
        store.park(follower(fid, "L", occurred_at=occurred), LOOKBACK)
    store.park(follower("other", "M"), LOOKBACK)
    claimed = store.claim_followers("default", "L", 10)
    assert [f.follower_id for f in claimed] == ["a", "b1", "b2", "c"]
    assert store.claim_followers("default", "L", 10) == []  # claimed rows are not waiting


def test_claim_in_batches_keeps_order(store: CausalStore) -> None:
    for i in range(7):
        store.park(follower(f"f{i}", "L", occurred_at=float(i)), LOOKBACK)
    batches = [store.claim_followers("default", "L", 3) for _ in range(3)]
    assert [[f.follower_id for f in b] for b in batches] == [
        ["f0", "f1", "f2"],
        ["f3", "f4", "f5"],
        ["f6"],
    ]


def test_claimed_rows_round_trip_every_field(store: CausalStore) -> None:
    original = follower("f1", "L", scope="s", occurred_at=12.5)
    store.park(original, LOOKBACK)
    (claimed,) = store.claim_followers("s", "L", 10)
    for name in (
        "scope",
        "follower_id",
        "leader_id",
        "task_name",
        "occurred_at",
        "payload",
        "content_type",
        "content_encoding",
        "hostname",
    ):
        assert getattr(claimed, name) == getattr(original, name), name
    assert claimed.row_id > 0 and claimed.parked_at > 0


def test_finish_deletes_and_unclaim_puts_back(store: CausalStore) -> None:
    store.park(follower("f1", "L"), LOOKBACK)
    store.park(follower("f2", "L"), LOOKBACK)
    first, second = store.claim_followers("default", "L", 10)
    store.finish([first])
    store.unclaim([second])
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f2"]


def test_an_expired_outcome_stays_while_a_follower_waits_behind_it(store: CausalStore) -> None:
    # Given f2 parked behind f1, and f1's outcome recorded without a claim (its worker died
    # after the record), then past its TTL
    store.park(follower("f2", "f1"), 60)
    assert store.record_done("default", "f1", seen_ttl=50)
    age(store, 51)
    # Then the sweep's expiry keeps it: f2 is the orphan handover's, not a lost follower
    assert store.expire_done(seen_ttl=50, limit=100) == 0
    # and when f1 is delivered again, parks behind K and is released, f1's outcome still
    # governs f2 (no restart of its lookback): f2 is due as it was
    assert store.park(follower("f1", "K"), 60) is ParkOutcome.PARKED
    store.record_done("default", "K")
    store.finish(store.claim_followers("default", "K", 10))
    age(store, 10)
    assert [f.follower_id for f in store.claim_orphans(100)] == ["f2"]


def test_a_released_row_whose_expired_outcome_was_marked_again_restarts_its_followers(
    store: CausalStore,
) -> None:
    # Given f1's outcome, expired but not yet swept, and f2 parking behind f1 afterwards:
    # its mark replaces the expired outcome
    assert store.record_done("default", "f1", seen_ttl=50) is False
    age(store, 51)
    assert store.park(follower("f2", "f1"), 60) is ParkOutcome.PARKED
    age(store, 30)
    # When f1, delivered again and parked behind K, is released by K
    assert store.park(follower("f1", "K"), 60) is ParkOutcome.PARKED
    store.record_done("default", "K")
    claimed = store.claim_followers("default", "K", 10)
    assert [f.follower_id for f in claimed] == ["f1"]
    store.finish(claimed)
    # Then f2 waits a whole lookback again from the release: f1 is on its way to run
    age(store, 31)
    assert store.claim_lost(600, 100) == []


def test_a_claim_takes_no_more_rows_than_its_limit(store: CausalStore) -> None:
    # Each claim takes the next batch in occurred order, whatever plan the database picks
    for i in range(4):
        store.park(follower(f"f{i}", "L", occurred_at=float(i)), LOOKBACK)
    record = store.record_done_and_claim("default", "L", 1)
    assert [f.follower_id for f in record.claimed] == ["f0"] and not record.complete
    assert [f.follower_id for f in store.claim_followers("default", "L", 1)] == ["f1"]
    assert [f.follower_id for f in store.claim_followers("default", "L", 2)] == ["f2", "f3"]


def test_finish_and_unclaim_touch_only_the_rows_of_their_own_scope(store: CausalStore) -> None:
    # Rows of several scopes released in one batch (a sweep's) are finished scope by scope
    store.park(follower("f1", "L", scope="a"), LOOKBACK)
    store.park(follower("f1", "L", scope="b"), LOOKBACK)
    store.park(follower("f2", "L", scope="b"), LOOKBACK)
    age(store, LOOKBACK + 1)
    lost = store.claim_lost(600, 10)
    assert sorted((f.scope, f.follower_id) for f in lost) == [("a", "f1"), ("b", "f1"), ("b", "f2")]
    store.finish([f for f in lost if f.follower_id == "f1"])
    store.unclaim([f for f in lost if f.follower_id == "f2"])
    assert [(s.scope, s.waiting, s.releasing) for s in store.stats()] == [("b", 1, 0)]


def test_scopes_are_isolated(store: CausalStore) -> None:
    store.park(follower("f1", "L", scope="a"), LOOKBACK)
    store.park(follower("f1", "L", scope="b"), LOOKBACK)  # same ids, other scope: its own row
    store.record_done("a", "L")
    assert store.lookup("b", ["L"]).done == frozenset()
    assert [f.scope for f in store.claim_followers("a", "L", 10)] == ["a"]
    assert store.count_followers("b", "L") == 1
    forgotten = store.forget("b", "f1")
    assert forgotten is not None and (forgotten.scope, forgotten.follower_id) == ("b", "f1")
    assert forgotten.leader_id == "L" and forgotten.hostname == "worker@test"
    assert store.forget("b", "f1") is None


def test_park_after_leader_done_takes_the_row_back(store: CausalStore) -> None:
    # The interleaving the seed got wrong: the follower read "leader not done", then the
    # leader committed and claimed (nothing yet), then the follower parks.
    store.record_done("default", "L")
    assert store.claim_followers("default", "L", 10) == []
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.LEADER_DONE
    assert store.count_followers("default", "L") == 0


def test_park_before_leader_done_is_claimed_by_the_leader(store: CausalStore) -> None:
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.PARKED
    store.record_done("default", "L")
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f1"]


def test_a_park_that_meets_its_row_being_released_says_so_and_stores_nothing(
    store: CausalStore,
) -> None:
    store.park(follower("f1", "L"), LOOKBACK)
    store.record_done("default", "L")
    (claimed,) = store.claim_followers("default", "L", 10)  # the leader is publishing it
    # A duplicate delivery, or a follower of several leaders that L released and that
    # waits for M next: its earlier row is still there, being released
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.RELEASING
    assert store.park(follower("f1", "M"), LOOKBACK) is ParkOutcome.RELEASING
    assert store.count_followers("default", "M") == 0
    # Once its releaser deleted the row, the follower parks behind M
    store.finish([claimed])
    assert store.park(follower("f1", "M"), LOOKBACK) is ParkOutcome.PARKED
    assert store.count_followers("default", "M") == 1


def test_record_done_says_whether_a_follower_may_wait(store: CausalStore) -> None:
    # No follower parked before the record: nothing to claim, and one parking later runs
    assert store.record_done("default", "alone") is False
    assert store.park(follower("late", "alone"), LOOKBACK) is ParkOutcome.LEADER_DONE
    # A follower parked before the record: the leader must claim it
    store.park(follower("f1", "L"), LOOKBACK)
    assert store.record_done("default", "L") is True
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f1"]


def test_record_done_and_claim_takes_the_first_batch_with_the_record(
    store: CausalStore,
) -> None:
    # A task nobody waited for: recorded, nothing claimed, nothing more to look for
    alone = store.record_done_and_claim("default", "alone", 10)
    assert (alone.waited, alone.claimed, alone.complete) == (False, [], True)
    assert "alone" in store.lookup("default", ["alone"]).done
    # Five followers, claimed three at a time: the first batch comes with the record
    for i, occurred in enumerate([5.0, 1.0, 4.0, 2.0, 3.0]):
        store.park(follower(f"f{i}", "L", occurred_at=occurred), LOOKBACK)
    first = store.record_done_and_claim("default", "L", 3)
    assert first.waited and not first.complete  # a full batch: more may wait
    assert [f.follower_id for f in first.claimed] == ["f1", "f3", "f4"]
    assert "L" in store.lookup("default", ["L"]).done
    rest = store.claim_followers("default", "L", 3)
    assert [f.follower_id for f in rest] == ["f2", "f0"]
    # Recorded again (a redelivered leader): nothing left to claim, and that is complete
    again = store.record_done_and_claim("default", "L", 3)
    assert (again.claimed, again.complete) == ([], True)


def test_record_done_and_claim_with_no_limit_claims_nothing(store: CausalStore) -> None:
    # The runtime asks for none when the release depth is exceeded: the rows stay waiting
    store.park(follower("f1", "L"), LOOKBACK)
    record = store.record_done_and_claim("default", "L", 0)
    assert (record.waited, record.claimed, record.complete) == (True, [], False)
    assert store.count_followers("default", "L") == 1
    assert store.park(follower("late", "L"), LOOKBACK) is ParkOutcome.LEADER_DONE


def test_duplicate_park_after_the_leader_recorded_done_leaves_it_to_the_claim(
    store: CausalStore,
) -> None:
    store.park(follower("f1", "L"), LOOKBACK)
    assert store.record_done("default", "L") is True
    # The same follower delivered again before the leader claimed: not run by this copy
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.PARKED
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f1"]


def test_expired_done_record_counts_as_not_done_for_park(store: CausalStore) -> None:
    store.record_done("default", "L", seen_ttl=50)
    age(store, 100)
    assert store.park(follower("f1", "L"), LOOKBACK) is ParkOutcome.PARKED
    # The leader running again releases it
    assert store.record_done("default", "L") is True
    assert [f.follower_id for f in store.claim_followers("default", "L", 10)] == ["f1"]


def test_claim_lost_waits_for_the_lookback_and_returns_occurred_order(
    store: CausalStore,
) -> None:
    store.park(follower("b", "gone", occurred_at=3.0), LOOKBACK)
    store.park(follower("a", "gone", occurred_at=2.0), LOOKBACK)
    store.park(follower("c", "also-gone", occurred_at=1.0), LOOKBACK)
    assert store.claim_lost(release_timeout=60, limit=100) == []
    age(store, 61)
    lost = store.claim_lost(release_timeout=60, limit=100)
    assert [f.follower_id for f in lost] == ["c", "a", "b"]
    assert store.claim_lost(release_timeout=600, limit=100) == []


def test_a_lost_chain_comes_back_in_causal_order(store: CausalStore) -> None:
    # Given the seed's one <- two <- (three_a, three_b), sent backwards, and "one" never comes
    store.park(follower("three_b", "two", occurred_at=3.0), LOOKBACK)
    store.park(follower("three_a", "two", occurred_at=2.0), LOOKBACK)
    store.park(follower("two", "one", occurred_at=1.0), LOOKBACK)
    age(store, 61)
    # When the lookback has passed, only "two" is lost: the others' leader came (it is
    # parked), so they wait for it instead of running beside it
    (stats,) = store.stats()
    assert (stats.waiting, stats.overdue) == (3, 1)
    lost = store.claim_lost(release_timeout=600, limit=100)
    assert [f.follower_id for f in lost] == ["two"]
    # and once "two" is released, its followers' lookback starts again: no sweep takes
    # them ahead of it while it is on its way
    store.finish(lost)
    assert store.claim_lost(release_timeout=600, limit=100) == []
    assert store.stats()[0].overdue == 0
    # Then "two" runs and releases them, in occurred order
    record = store.record_done_and_claim("default", "two", 100)
    assert [f.follower_id for f in record.claimed] == ["three_a", "three_b"]


def test_followers_of_a_released_leader_that_never_runs_are_lost_a_lookback_later(
    store: CausalStore,
) -> None:
    store.park(follower("f2", "f1"), LOOKBACK)
    store.park(follower("f1", "gone"), LOOKBACK)
    age(store, 61)
    store.finish(store.claim_lost(600, 100))  # f1, which then dies
    age(store, 59)
    assert store.claim_lost(release_timeout=600, limit=100) == []
    age(store, 2)
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["f2"]


@pytest.mark.parametrize("limit", [0, 1], ids=["claimed-after-the-record", "with-the-record"])
def test_a_leader_releasing_a_parked_chain_restarts_the_lookback_behind_it(
    store: CausalStore, limit: int
) -> None:
    # Given L <- f1 <- f2 parked long ago, L's arrival near the end of the lookback
    store.park(follower("f2", "f1"), LOOKBACK)
    store.park(follower("f1", "L"), LOOKBACK)
    age(store, 59)
    # When L runs and releases f1 (with its done record, or by a claim after it)
    record = store.record_done_and_claim("default", "L", limit)
    claimed = record.claimed or store.claim_followers("default", "L", 100)
    assert [f.follower_id for f in claimed] == ["f1"]
    store.finish(claimed)
    # Then f2 waits a whole lookback more for f1, which is on its way
    age(store, 2)
    assert store.claim_lost(release_timeout=600, limit=100) == []
    assert store.stats()[0].overdue == 0


def test_claim_lost_republishes_rows_whose_releaser_died(store: CausalStore) -> None:
    store.park(follower("f1", "L"), LOOKBACK)
    store.record_done("default", "L")
    store.claim_followers("default", "L", 10)  # ... and the releasing process dies here
    assert store.claim_lost(release_timeout=30, limit=10) == []
    age(store, 31)
    assert [f.follower_id for f in store.claim_lost(30, 10)] == ["f1"]


def test_expire_done_in_batches(store: CausalStore) -> None:
    for i in range(5):
        store.record_done("default", f"t{i}", seen_ttl=60)
    assert store.expire_done(seen_ttl=60, limit=10) == 0
    age(store, 61)
    store.record_done("default", "fresh", seen_ttl=60)
    assert store.expire_done(seen_ttl=60, limit=3) == 3
    assert store.expire_done(seen_ttl=60, limit=3) == 2
    assert store.lookup("default", ["fresh"]).done == {"fresh"}


def test_stats_per_scope(store: CausalStore) -> None:
    store.park(follower("f1", "L", scope="a"), LOOKBACK)
    store.park(follower("f2", "L", scope="a"), LOOKBACK)
    store.park(follower("f3", "M", scope="b"), LOOKBACK)
    store.claim_followers("a", "L", 1)
    age(store, 100)
    stats = {s.scope: s for s in store.stats()}
    assert (stats["a"].waiting, stats["a"].releasing, stats["a"].overdue) == (1, 1, 1)
    assert (stats["b"].waiting, stats["b"].releasing) == (1, 0)
    assert stats["b"].oldest_parked_at is not None


def test_stats_count_each_row_in_its_own_state(store: CausalStore) -> None:
    # Given, in scope "a": a row claimed long ago (its releaser died), a lost row and a
    # due row held back by its parked leader; in scope "b" only a row being released
    store.park(follower("f1", "L", scope="a"), LOOKBACK)
    store.claim_followers("a", "L", 1)
    age(store, 100)
    store.park(follower("f2", "M", scope="a"), LOOKBACK)
    store.park(follower("f3", "f2", scope="a"), LOOKBACK)
    store.park(follower("g1", "N", scope="b"), LOOKBACK)
    store.claim_followers("b", "N", 1)
    age(store, 100)
    parked = {i.follower_id: i.parked_at for i in store.list_followers(None, None, 10)}
    # When an operator asks for the figures
    stats = store.stats(release_timeout=150)
    # Then the oldest park is that of a waiting row, and each row counts once
    assert [
        (s.scope, s.waiting, s.releasing, s.oldest_parked_at, s.overdue, s.stuck) for s in stats
    ] == [
        ("a", 2, 1, min(parked["f2"], parked["f3"]), 1, 1),
        ("b", 0, 1, None, 0, 0),
    ]


@pytest.mark.timeout(120)
def test_concurrent_claims_are_disjoint(store: CausalStore) -> None:
    for i in range(400):
        store.park(follower(f"f{i}", "L", occurred_at=float(i)), LOOKBACK)
    age(store, 1000)
    barrier = threading.Barrier(4)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(lost: bool) -> None:
        barrier.wait()
        while True:
            batch = store.claim_lost(500, 25) if lost else store.claim_followers("default", "L", 25)
            if not batch:
                return
            with lock:
                claimed.extend(f.follower_id for f in batch)

    threads = [threading.Thread(target=claimer, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(claimed)
    assert len(counts) == 400 and max(counts.values()) == 1


def test_operator_listing_and_single_release(store: CausalStore) -> None:
    store.park(follower("f1", "L", scope="a"), LOOKBACK)
    store.park(follower("f2", "M", scope="a"), LOOKBACK)
    store.park(follower("f1", "L", scope="b"), LOOKBACK)
    assert [(i.scope, i.follower_id) for i in store.list_followers(None, None, 10)] == [
        ("a", "f1"),
        ("a", "f2"),
        ("b", "f1"),
    ]
    assert [i.follower_id for i in store.list_followers("a", "M", 10)] == ["f2"]
    assert len(store.list_followers(None, None, 2)) == 2
    assert store.scopes_of("f1") == ["a", "b"]
    claimed = store.claim_one("b", "f1")
    assert claimed is not None and claimed.scope == "b"
    assert store.claim_one("b", "missing") is None
    stats = {s.scope: s for s in store.stats(release_timeout=30)}
    assert (stats["b"].releasing, stats["b"].stuck) == (1, 0)
    age(store, 31)
    assert store.stats(release_timeout=30)[1].stuck == 1
    assert store.clock() > 1_600_000_000


def test_operator_reads_one_follower_whole_and_counts_what_a_listing_cut(
    store: CausalStore,
) -> None:
    original = follower("f1", "L", scope="a", occurred_at=12.5)
    store.park(original, LOOKBACK)
    store.park(follower("f2", "L", scope="a"), 30.0)
    store.park(follower("f3", "M", scope="b"), LOOKBACK)
    one = store.parked_follower("a", "f1")
    assert one is not None and one.as_follower() == original
    assert (one.leader_id, one.task_name, one.occurred_at) == ("L", "tests.step", 12.5)
    assert (one.lookback, one.deadline, one.claimed_at) == (
        LOOKBACK,
        one.parked_at + LOOKBACK,
        None,
    )
    assert store.parked_follower("b", "f1") is None
    assert store.parked_follower("a", "missing") is None
    store.claim_one("a", "f2")
    claimed = store.parked_follower("a", "f2")
    assert claimed is not None and claimed.claimed_at is not None
    # A count covers waiting and releasing rows, under the listing's own filters
    assert store.count_parked(None, None) == 3
    assert store.count_parked("a", None) == 2
    assert store.count_parked(None, "L") == 2
    assert store.count_parked("b", "L") == 0


def test_bury_moves_a_claimed_row_aside_once(store: CausalStore) -> None:
    store.park(follower("bad", "L", scope="a"), LOOKBACK)
    store.park(follower("good", "L", scope="a"), LOOKBACK)
    store.record_done("a", "L")
    bad, _ = sorted(store.claim_followers("a", "L", 10), key=lambda f: f.follower_id)
    store.bury(bad, "corrupt payload")
    store.bury(bad, "corrupt payload")  # a second burial (after a crash) is a no-op
    (stats,) = store.stats()
    assert (stats.dead, stats.releasing, stats.waiting) == (1, 1, 0)
    assert [i.follower_id for i in store.list_followers("a", None, 10)] == ["good"]


def test_postgresql_connections_of_the_store_carry_no_session_state(pg_store: SQLStore) -> None:
    # Behind a transaction-pooling proxy a connection serves other clients next: a SET
    # made by the pg_store would leak into them. Only the start-up option pinning READ
    # COMMITTED is the pg_store's own, and it is not session state.
    try:
        for i in range(6):
            pg_store.park(follower(f"f{i}", f"L{i}"), LOOKBACK)
            record = pg_store.record_done_and_claim("default", f"L{i}", 10)
            pg_store.finish(record.claimed)
        pg_store.stats()
        pg_store.claim_lost(60.0, 10)
        raw = pg_store.engine.raw_connection()  # the pooled connection those calls used
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT name FROM pg_settings WHERE source = 'session'")
            assert cursor.fetchall() == []
            cursor.execute("SHOW transaction_isolation")
            assert cursor.fetchone() == ("read committed",)
        finally:
            raw.close()
    finally:
        truncate(pg_store)
        pg_store.close()


# -- the edges of the promise: deadlines, marks, failures, rings, row ids -------------------


def test_each_row_keeps_the_lookback_of_the_app_that_parked_it(store: CausalStore) -> None:
    # Given two apps sharing one store: one waits 60 s, the other 900 s
    store.park(follower("short", "gone"), 60)
    store.park(follower("long", "gone"), 900)
    # When 61 s pass, a sweep (whichever app runs it) takes only the short one
    age(store, 61)
    short = store.claim_lost(600, 100)
    assert [f.follower_id for f in short] == ["short"]
    store.finish(short)
    assert store.stats()[0].overdue == 0
    # Then the long one is due once its own 900 s have passed
    age(store, 840)
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["long"]


def test_a_restarted_lookback_is_the_rows_own(store: CausalStore) -> None:
    store.park(follower("f2", "f1"), 900)
    store.park(follower("f1", "gone"), 60)
    age(store, 901)
    store.finish(store.claim_lost(600, 100))  # f1, which never runs
    age(store, 61)  # f1's lookback is over, not f2's (900 s from f1's release)
    assert store.claim_lost(600, 100) == []
    age(store, 840)
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["f2"]


def test_a_mark_stays_while_its_followers_wait(store: CausalStore) -> None:
    # Given a chain L <- f1 <- f2 where f1 is parked behind L for longer than the seen TTL
    store.park(follower("f2", "f1"), LOOKBACK)
    store.park(follower("f1", "L"), 10 * TTL)
    age(store, 2 * TTL)
    # When housekeeping runs, the marks of L and f1 stay: their followers still wait
    assert store.expire_done(seen_ttl=TTL, limit=100) == 0
    # Then L's success still finds f1, and f1's finds f2: no follower waits a lookback
    record = store.record_done_and_claim("default", "L", 100)
    assert [f.follower_id for f in record.claimed] == ["f1"]
    store.finish(record.claimed)
    record = store.record_done_and_claim("default", "f1", 100)
    assert [f.follower_id for f in record.claimed] == ["f2"]
    store.finish(record.claimed)
    # and once nothing waits, old marks and records go
    age(store, 2 * TTL)
    assert store.expire_done(seen_ttl=TTL, limit=100) == 2


def test_a_failure_is_recorded_and_met_by_later_parks(store: CausalStore) -> None:
    store.park(follower("early", "L"), LOOKBACK)
    record = store.record_done_and_claim("default", "L", 100, failed=True)
    assert record.waited and [f.follower_id for f in record.claimed] == ["early"]
    store.finish(record.claimed)
    lookup = store.lookup("default", ["L", "other"])
    assert (lookup.done, lookup.failed) == (frozenset(), {"L"})
    assert store.park(follower("late", "L"), LOOKBACK) is ParkOutcome.LEADER_FAILED
    # A success after the failure (the leader sent again) replaces it
    store.record_done("default", "L")
    lookup = store.lookup("default", ["L"])
    assert (lookup.done, lookup.failed) == ({"L"}, frozenset())
    # and failure records expire after the seen TTL, as done records do
    store.record_done("default", "M", failed=True)
    age(store, TTL + 1)
    assert store.expire_done(seen_ttl=TTL, limit=100) == 2
    assert store.lookup("default", ["M"]).failed == frozenset()


def test_a_ring_of_followers_is_broken_at_its_first_member(store: CausalStore) -> None:
    # Given A follows B, B follows A, and C follows A: nobody's leader will ever come
    store.park(follower("B", "A", occurred_at=2.0), LOOKBACK)
    store.park(follower("A", "B", occurred_at=1.0), LOOKBACK)
    store.park(follower("C", "A", occurred_at=3.0), LOOKBACK)
    store.park(follower("D", "gone", occurred_at=4.0), LOOKBACK)
    assert store.claim_cycles(100) == []  # not before their deadline
    age(store, LOOKBACK + 1)
    # When the sweep runs: each of them waits for a parked leader, so none is lost ...
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["D"]
    # (status counts the ring's first member as overdue: the next sweep releases it)
    assert store.stats(600)[0].overdue == 1
    # ... and the ring gives up its first member in occurred order, once
    broken = store.claim_cycles(100)
    assert [f.follower_id for f in broken] == ["A"]
    assert store.claim_cycles(100) == []
    store.finish(broken)
    # Then A's release restarts B's and C's wait, and A's success releases them in order
    assert store.claim_lost(600, 100) == []
    record = store.record_done_and_claim("default", "A", 100)
    assert [f.follower_id for f in record.claimed] == ["B", "C"]


def test_make_due_leaves_followers_to_the_next_sweep(store: CausalStore) -> None:
    store.park(follower("f1", "L"), 900)
    store.park(follower("f2", "L"), 900)
    store.park(follower("g", "M"), 900)
    store.record_done("default", "L")
    assert store.make_due("default", "L") == 2
    age(store, 1)
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["f1", "f2"]
    assert store.make_due("default", "L") == 0


def test_row_ids_are_never_reused(store: CausalStore) -> None:
    # A releaser that stalled past its claim deletes by row id: the id must not belong to
    # a newer follower by then (SQLite reuses plain rowids after a delete).
    store.park(follower("old", "L"), LOOKBACK)
    (stalled,) = store.claim_followers("default", "L", 10)
    age(store, 61)
    (republished,) = store.claim_lost(60, 10)  # the sweep takes it over ...
    store.finish([republished])  # ... and publishes it
    store.park(follower("new", "L"), LOOKBACK)  # a newer follower parks
    store.finish([stalled])  # the stalled releaser wakes up and deletes "its" row
    assert [i.follower_id for i in store.list_followers(None, None, 10)] == ["new"]


def test_followers_a_dead_leader_left_unclaimed_are_the_sweeps_after_the_release_timeout(
    store: CausalStore,
) -> None:
    # Given three followers, and a leader that recorded done, claimed one, and died
    for i in range(3):
        store.park(follower(f"f{i}", "L", occurred_at=float(i)), 900)
    record = store.record_done_and_claim("default", "L", 1, release_timeout=30)
    assert [f.follower_id for f in record.claimed] == ["f0"]
    # When less than the release timeout has passed, the release is still the leader's
    assert store.claim_orphans(100) == []
    # Then after it, the sweep claims what still waits, long before the lookback
    age(store, 31)
    assert [f.follower_id for f in store.claim_orphans(100)] == ["f1", "f2"]
    assert store.claim_orphans(100) == []
    # and a leader whose release finished is left alone
    store.park(follower("g", "M"), 900)
    done = store.record_done_and_claim("default", "M", 10, release_timeout=30)
    assert [f.follower_id for f in done.claimed] == ["g"]
    age(store, 31)
    assert store.claim_orphans(100) == []


def test_followers_made_due_stay_due_when_their_leaders_row_is_deleted_after_it_ran(
    store: CausalStore,
) -> None:
    # Given K <- L <- F parked, and K's releaser that claimed L and is still publishing
    store.park(follower("L", "K", occurred_at=1.0), LOOKBACK)
    store.park(follower("F", "L", occurred_at=2.0), 600)
    store.record_done("default", "K")
    (claimed_l,) = store.claim_followers("default", "K", 10)
    # When L runs elsewhere before that releaser deletes L's row, and L is at the depth
    # limit: its follower is made due for the next sweep
    assert store.record_done_and_claim("default", "L", 0).waited
    assert store.make_due("default", "L") == 1
    store.finish([claimed_l])
    # Then the delete of L's row does not push F's deadline back: the next sweep takes it
    age(store, 1)
    assert [f.follower_id for f in store.claim_lost(600, 10)] == ["F"]


def test_a_ring_is_found_behind_more_older_chains_than_one_search_looks_at(
    store: CausalStore,
) -> None:
    # Given chains P1 <- P2 ... whose heads wait for leaders that never come, parked first,
    # and then a ring A <-> B, all past their deadlines
    for chain in range(3):
        store.park(follower(f"P{chain}-1", f"gone-{chain}", occurred_at=1.0), LOOKBACK)
        for i in range(2, 5):
            store.park(follower(f"P{chain}-{i}", f"P{chain}-{i - 1}", occurred_at=i), LOOKBACK)
    age(store, 10)
    store.park(follower("A", "B", occurred_at=10.0), LOOKBACK)
    store.park(follower("B", "A", occurred_at=11.0), LOOKBACK)
    age(store, LOOKBACK + 1)
    # When sweeps search for rings two candidates at a time (the earliest deadlines first)
    found: list[str] = []
    for _ in range(6):
        found += [f.follower_id for f in store.claim_cycles(2)]
    # Then the candidates that lead to no ring make room, and the ring is found
    assert found == ["A"]


def test_a_follower_postponed_by_the_ring_search_is_due_again_once_its_leader_is_forgotten(
    store: CausalStore,
) -> None:
    # Given B behind A, and A behind L, which never comes; B parked first, long ago
    store.park(follower("B", "A"), LOOKBACK)
    age(store, LOOKBACK + 1)
    store.park(follower("A", "L"), LOOKBACK)
    # When a sweep's ring search finds B in no ring (and postpones it)
    assert store.claim_lost(600, 100) == []
    assert store.claim_cycles(100) == []
    # and an operator forgets A
    assert store.forget("default", "A")
    # Then B, whose own lookback is over and whose leader is gone, is overdue and swept
    assert store.stats()[0].overdue == 1
    assert [f.follower_id for f in store.claim_lost(600, 100)] == ["B"]


def test_a_park_whose_leaders_failure_expires_meanwhile_parks(
    store: CausalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a failure record about to expire, and a park whose look at the record is late
    store.record_done("default", "L", failed=True, seen_ttl=0.3)
    late_lookup = store.lookup

    def lookup(scope: str, ids: Any) -> Any:
        time.sleep(0.5)
        return late_lookup(scope, ids)

    monkeypatch.setattr(store, "lookup", lookup)
    # When the park meets the failure but the record has expired by its second look
    outcome = store.park(follower("F", "L"), LOOKBACK)
    # Then it parks rather than report a success that never happened
    assert outcome in (ParkOutcome.PARKED, ParkOutcome.LEADER_FAILED)
    assert outcome is ParkOutcome.LEADER_FAILED or store.count_followers("default", "L") == 1


def test_lookups_of_many_ids_answer_right_however_often_they_are_made(
    store: CausalStore,
) -> None:
    # Given done and failed leaders (a sweep looks up every leader of a claimed batch at
    # once, under causal_on_leader_failure="fail": often more than two)
    for leader in ("a", "b", "c"):
        store.record_done("default", leader, seen_ttl=TTL)
    store.record_done("default", "d", failed=True, seen_ttl=TTL)
    # When lookups of three and of four ids follow each other, as sweep after sweep makes
    # them (a collection between them, as a long-running process has)
    for _ in range(100):
        gc.collect()
        three = store.lookup("default", ["a", "b", "c"])
        gc.collect()
        four = store.lookup("default", ["x", "y", "a", "d"])
        # Then each answers for its own ids
        assert (three.done, three.failed) == (frozenset("abc"), frozenset())
        assert (four.done, four.failed) == (frozenset("a"), frozenset("d"))
