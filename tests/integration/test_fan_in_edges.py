"""Edges of fan-in, driven through the worker's own decision (``CausalTask._may_run``) with
the runtime's releases captured as the messages a worker would receive, on every store:
the sweep finishing the release of a leader that succeeded, and a leader whose record
expires while its follower waits for another."""

from __future__ import annotations

from celery_causal.payload import FOLLOWS
from celery_causal.store import CausalStore
from tests.helpers import age, wait_for
from tests.integration.driver import SCOPE, Driver


def _parked_fan_in(store: CausalStore, **conf: object) -> Driver:
    d = Driver(store, **conf)
    assert d.deliver("F", {FOLLOWS: ["a", "b"]}) is False  # parked behind a
    assert store.count_followers(SCOPE, "a") == 1
    return d


def _deliver_all(d: Driver) -> list[bool]:
    assert d.published, "nothing was released"
    return [d.deliver("F", headers) for headers in d.published]


def test_orphaned_fan_in_follower_released_by_sweep_runs_before_its_other_leader(
    store: CausalStore,
) -> None:
    d = _parked_fan_in(store)
    # a succeeded: its done record is committed; its process died before its claim
    assert store.record_done(SCOPE, "a") is True
    age(store, 120)  # past causal_release_timeout (60 s), far within the lookback (900 s)
    d.runtime.sweep()  # claim_orphans finishes a's release
    runs = _deliver_all(d)
    assert store.lookup(SCOPE, ["b"]).done == frozenset()  # b never ran
    assert runs == [False], "the fan-in follower ran although its leader b never ran"


def test_stuck_fan_in_release_republished_by_sweep_runs_before_its_other_leader(
    store: CausalStore,
) -> None:
    d = _parked_fan_in(store)
    # a succeeded and claimed F; its process died before publishing it
    record = store.record_done_and_claim(SCOPE, "a", 100)
    assert [r.follower_id for r in record.claimed] == ["F"]
    age(store, 120)
    d.runtime.sweep()  # claim_lost takes the stuck row back
    runs = _deliver_all(d)
    assert runs == [False], "the fan-in follower ran although its leader b never ran"


def test_depth_guard_hands_a_fan_in_follower_to_the_sweep_which_runs_it_before_b(
    store: CausalStore,
) -> None:
    d = _parked_fan_in(store, causal_max_depth=3)
    # a itself was released at depth 3: the guard leaves its followers to the next sweep
    d.runtime.complete(SCOPE, "a", 3)
    assert d.published == []
    d.runtime.sweep()
    runs = _deliver_all(d)
    assert runs == [False], "the fan-in follower ran although its leader b never ran"


def test_a_lost_fan_in_follower_released_by_the_sweep_runs(store: CausalStore) -> None:
    # Given a follower of [a, b] that waits behind a for a lookback of one second (real
    # time: its message counts from the store's clock at its first park)
    d = _parked_fan_in(store, causal_lookback=1, causal_seen_ttl=200)
    # When its lookback is over, the sweep releases it as lost, and it runs without them
    wait_for(lambda: (d.runtime.sweep(), d.published)[1], 10, "the sweep released it")
    assert _deliver_all(d) == [True]


def test_a_leader_found_done_on_arrival_is_not_waited_for_again(store: CausalStore) -> None:
    d = Driver(store)
    store.record_done(SCOPE, "a")  # a succeeded (nothing waited for it)
    age(store, 20 * 60)
    assert d.deliver("F", {FOLLOWS: ["a", "b"]}) is False  # a done: parked behind b
    assert store.count_followers(SCOPE, "b") == 1
    age(store, 12 * 60)  # within F's lookback; a's record (30 min) is over
    d.runtime.complete(SCOPE, "b", 0)  # b succeeds and releases F
    assert len(d.published) == 1
    runs = d.deliver("F", d.published[0])
    parked = store.list_followers(SCOPE, None, 10)
    assert runs, (
        f"F did not run although a and b both succeeded; parked again: "
        f"{[(p.follower_id, p.leader_id) for p in parked]}"
    )


def test_under_wait_a_failed_leader_leaves_its_fan_in_follower_to_the_sweep(
    store: CausalStore,
) -> None:
    # Given "wait", a follower of [a, b] parked behind a, and a that fails for good
    d = _parked_fan_in(store, causal_on_leader_failure="wait")
    d.runtime.leader_failed(SCOPE, "a", 0)
    # When b succeeds, the follower still waits behind a: nothing releases it but the sweep
    d.runtime.complete(SCOPE, "b", 0)
    assert d.published == []
    assert [(r.follower_id, r.leader_id) for r in store.list_followers(SCOPE, None, 10)] == [
        ("F", "a")
    ]
