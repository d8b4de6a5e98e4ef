"""Ordering keys in the storage contract, run against every store (memory, SQLite,
PostgreSQL): a key's sends form one chain, whatever the number of producers."""

from __future__ import annotations

import threading

from celery_causal.store import CausalStore, ParkOutcome
from tests.helpers import age, follower

LOOKBACK = 60.0


def test_a_free_key_gives_no_predecessor_then_each_send_follows_the_one_before(
    store: CausalStore,
) -> None:
    assert store.record_key("default", "k", "t1") is None
    assert store.record_key("default", "k", "t2") == "t1"
    assert store.record_key("default", "k", "t3") == "t2"
    (tail,) = store.key_tails("k")
    assert (tail.scope, tail.key, tail.task_id, tail.previous) == ("default", "k", "t3", "t2")
    assert tail.recorded_at > 1_600_000_000


def test_recording_the_newest_send_again_returns_the_same_predecessor(
    store: CausalStore,
) -> None:
    store.record_key("default", "k", "t1")
    assert store.record_key("default", "k", "t2") == "t1"
    assert store.record_key("default", "k", "t2") == "t1"  # a producer retrying its send
    assert store.record_key("default", "k", "t3") == "t2"


def test_a_send_recorded_again_after_later_sends_keeps_its_first_place(
    store: CausalStore,
) -> None:
    # An outbox replays t1's send after another producer sent t2 behind it
    store.record_key("default", "k", "t1")
    assert store.record_key("default", "k", "t2") == "t1"
    assert store.record_key("default", "k", "t1") is None  # its first answer
    assert [t.task_id for t in store.key_tails("k")] == ["t2"]  # still the newest
    assert store.record_key("default", "k", "t3") == "t2"
    # Once the sends are older than the seen TTL they are forgotten: a send of the same
    # id is a new one
    age(store, 100)
    assert store.expire_done(seen_ttl=50, limit=100) == 3
    assert store.record_key("default", "k", "t1") == "t3"


def test_a_key_is_freed_only_by_its_newest_task(store: CausalStore) -> None:
    store.record_key("default", "k", "t1")
    store.record_key("default", "k", "t2")
    # t1 finishing after t2 was sent: t2 follows t1 through t1's record, the key stays
    assert store.free_key("default", "k", "t1") is False
    assert [t.task_id for t in store.key_tails("k")] == ["t2"]
    assert store.free_key("default", "k", "t2") is True
    assert store.key_tails("k") == []
    assert store.record_key("default", "k", "t3") is None


def test_keys_are_isolated_by_scope_and_by_name(store: CausalStore) -> None:
    store.record_key("a", "k", "a1")
    store.record_key("b", "k", "b1")
    store.record_key("a", "other", "o1")
    assert store.record_key("a", "k", "a2") == "a1"
    assert store.record_key("b", "k", "b2") == "b1"
    assert [(t.scope, t.task_id) for t in store.key_tails("k")] == [("a", "a2"), ("b", "b2")]
    assert [t.task_id for t in store.key_tails("k", "b")] == ["b2"]
    assert store.free_key("b", "k", "a2") is False


def test_concurrent_producers_on_one_key_form_a_single_chain(store: CausalStore) -> None:
    # Given 4 producers recording 25 sends each on one key, all at once
    producers, sends = 4, 25
    barrier = threading.Barrier(producers)
    answers: dict[str, str | None] = {}
    lock = threading.Lock()

    def produce(p: int) -> None:
        barrier.wait()
        for i in range(sends):
            task_id = f"p{p}-{i}"
            previous = store.record_key("default", "k", task_id)
            with lock:
                answers[task_id] = previous

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one send found the key free, and following predecessors from the
    # newest task visits every send once: one chain, no fork, no lost link
    assert list(answers.values()).count(None) == 1
    (tail,) = store.key_tails("k")
    chain = [tail.task_id]
    while answers[chain[-1]] is not None:
        chain.append(answers[chain[-1]])  # type: ignore[arg-type]
    assert sorted(chain) == sorted(answers)
    # and each producer's sends are in the chain in its own send order
    order = {task_id: n for n, task_id in enumerate(reversed(chain))}
    for p in range(producers):
        positions = [order[f"p{p}-{i}"] for i in range(sends)]
        assert positions == sorted(positions)


def test_a_parked_follower_keeps_its_ordering_key_and_is_listed_by_it(
    store: CausalStore,
) -> None:
    keyed = follower("f1", "L", ordering_key="customer-7")
    assert store.park(keyed, LOOKBACK) is ParkOutcome.PARKED
    assert store.park(follower("f2", "L"), LOOKBACK) is ParkOutcome.PARKED
    listed = store.list_followers(None, None, 10, key="customer-7")
    assert [(i.follower_id, i.ordering_key) for i in listed] == [("f1", "customer-7")]
    assert store.count_parked(None, None, key="customer-7") == 1
    assert store.count_parked(None, None) == 2
    parked = store.parked_follower("default", "f1")
    assert parked is not None and parked.ordering_key == "customer-7"
    (claimed, _) = store.claim_followers("default", "L", 10)
    assert claimed.ordering_key == "customer-7"
