"""The seed's ordering cases through a real Celery worker (solo pool, in-memory broker).

One worker thread takes messages in FIFO order, so arrival order is exactly the order in
which messages are sent and the bodies' order can be asserted exactly, as the seed does.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kombu import Producer

from celery_causal.registry import runtime_for
from celery_causal.store import CausalStore
from tests.helpers import age, wait_for
from tests.integration.harness import Harness

SEED = {"one": None, "two": "one", "three_a": "two", "three_b": "two"}


@pytest.mark.parametrize(
    "arrival",
    [
        ["one", "two", "three_a", "three_b"],
        ["two", "three_a", "one", "three_b"],
        ["three_b", "three_a", "two", "one"],
    ],
    ids=["proper", "jumbled", "backwards"],
)
def test_seed_cases_run_in_causal_order(causal_store: CausalStore, arrival: list[str]) -> None:
    h = Harness(causal_store)
    base = time.time()
    occurred = {"one": base, "two": base + 1, "three_a": base + 2, "three_b": base + 3}
    for label in arrival:
        h.send(label, SEED[label], occurred=occurred[label])
    h.run_until(lambda: len(h.ran) >= 4, "four events")
    assert h.ran == ["one", "two", "three_a", "three_b"]


def test_a_follower_published_long_ago_still_waits_for_its_leader(
    causal_store: CausalStore,
) -> None:
    # A message older than the lookback (a broker backlog, a countdown, a store outage)
    # waits like any other: its wait counts from its park.
    h = Harness(causal_store, causal_lookback=60, causal_seen_ttl=120)
    h.send("late", "leader", occurred=time.time() - 3600)
    h.send("marker")
    h.run_until(lambda: "marker" in h.ran, "marker")
    assert h.ran == ["marker"]
    assert causal_store.count_followers("events", h.id("leader")) == 1
    h.send("leader")
    h.run_until(lambda: "late" in h.ran, "late")
    assert h.ran == ["marker", "leader", "late"]


def test_scopes_do_not_interfere(causal_store: CausalStore) -> None:
    h = Harness(causal_store)
    h.send("follower-other", "leader", task=h.other)
    h.send("follower-events", "leader")
    h.send("leader")  # an events-scope task with the id "leader"
    h.run_until(lambda: "follower-events" in h.ran, "events follower")
    assert h.ran == ["leader", "follower-events"]
    assert causal_store.count_followers("other", h.id("leader")) == 1


def test_async_result_resolves_after_release(causal_store: CausalStore) -> None:
    h = Harness(causal_store)
    follower = h.send("f", "L")
    with h.worker():
        wait_for(lambda: causal_store.count_followers("events", h.id("L")) == 1, 30, "park")
        h.send("L")
        assert follower.get(timeout=30) == "f"
    assert h.ran == ["L", "f"]


def test_duplicates_do_not_run_twice(causal_store: CausalStore) -> None:
    h = Harness(causal_store)
    h.send("f", "L")
    h.send("f", "L")  # the parked follower delivered twice
    h.send("L")
    h.send("L")  # a finished task delivered again
    h.send("marker")
    h.run_until(lambda: "marker" in h.ran, "marker")
    with h.worker():
        h.send("f", "L")  # and the released follower once more, after it ran
        h.send("marker2")
        wait_for(lambda: "marker2" in h.ran, 30, "marker2")
    assert sorted(h.ran) == ["L", "f", "marker", "marker2"]


def test_leader_redelivered_after_a_crash_past_its_done_record_releases_followers(
    causal_store: CausalStore,
) -> None:
    # Given a parked follower and a leader whose process died right after storing its done
    # record, before claiming its followers (the done record exists, the follower waits)
    h = Harness(causal_store)
    h.send("f", "L")
    h.run_until(lambda: causal_store.count_followers("events", h.id("L")) == 1, "park")
    causal_store.record_done("events", h.id("L"))
    # When the leader's message comes back (acks_late redelivery) and is skipped as done
    h.send("L")
    h.run_until(lambda: "f" in h.ran, "the follower")
    # Then its body does not run again, and the follower it left behind is released
    assert h.ran == ["f"]
    assert causal_store.count_followers("events", h.id("L")) == 0


def test_deduplicate_redelivered_checks_followers_but_not_fresh_leaders(
    causal_store: CausalStore,
) -> None:
    h = Harness(causal_store, causal_deduplicate="redelivered")
    h.send("L")
    h.send("f", "L")
    h.run_until(lambda: h.ran == ["L", "f"], "leader and follower")
    # A producer sending a finished task without follows again is not a broker
    # redelivery: it runs again, as in plain Celery. A follower's copy is still skipped.
    h.send("f", "L")
    h.send("L")
    h.run_until(lambda: h.ran.count("L") == 2, "the leader's second copy")
    assert h.ran == ["L", "f", "L"]


def test_depth_guard_leaves_deep_followers_for_the_sweep(causal_store: CausalStore) -> None:
    # Given a chain e0 <- e1 <- ... <- e5 sent backwards, with at most 3 release generations
    h = Harness(causal_store, causal_max_depth=3, causal_lookback=60, causal_seen_ttl=120)
    for i in range(5, 0, -1):
        h.send(f"e{i}", f"e{i - 1}")
    h.send("e0")
    h.run_until(lambda: len(h.ran) >= 4, "three generations")
    # Then e1..e3 were released in cascade and e4 stays parked, not dropped
    assert h.ran == ["e0", "e1", "e2", "e3"]
    assert causal_store.count_followers("events", h.id("e3")) == 1
    # When the next sweep runs (no lookback later: the guard made e4 due at once; e5 waits
    # for e4, which is parked), the rest of the chain runs once each, in causal order
    assert runtime_for(h.app).sweep().released == 1
    h.run_until(lambda: len(h.ran) >= 6, "rest of the chain")
    assert h.ran[4:] == ["e4", "e5"]
    assert sum(s.waiting + s.releasing for s in causal_store.stats()) == 0


def test_chain_of_21_backwards_trips_the_default_depth_guard(
    causal_store: CausalStore,
) -> None:
    h = Harness(causal_store)
    for i in range(21, 0, -1):
        h.send(f"e{i}", f"e{i - 1}")
    h.send("e0")
    h.run_until(lambda: len(h.ran) >= 21, "20 generations")
    assert h.ran == [f"e{i}" for i in range(21)]
    assert causal_store.count_followers("events", h.id("e20")) == 1


def test_log_lines_name_task_leader_and_scope(
    causal_store: CausalStore, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="celery_causal")
    h = Harness(causal_store, causal_max_depth=1, causal_lookback=60, causal_seen_ttl=120)
    h.send("b", "a")
    h.send("c", "b")
    h.send("a")
    h.send("a")  # duplicate
    h.run_until(lambda: h.ran == ["a", "b"], "a and b")
    age(causal_store, 61)
    runtime_for(h.app).sweep()
    h.run_until(lambda: "c" in h.ran, "c released by the sweep")

    def line(start: str, level: int) -> str:
        found = [r for r in caplog.records if r.getMessage().startswith(start)]
        assert found, f"no log line starting {start!r}"
        assert found[0].levelno == level
        return found[0].getMessage()

    for text in [
        line("parked task", logging.INFO),
        line("released task", logging.INFO),
        line("lost follower", logging.WARNING),
        line("depth exceeded", logging.WARNING),
    ]:
        assert "'events'" in text and h.tag in text, text
    assert h.id("c") in line("lost follower", logging.WARNING)
    assert h.id("b") in line("depth exceeded", logging.WARNING)  # c's leader, past the depth
    assert h.id("a") in line("duplicate skip", logging.INFO)


def refuse_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the broker refuse every release publish (simulated at kombu's publish call,
    the one part not made real here); other publishes, such as results, go through."""
    real_publish = Producer.publish

    def refusing(self: Producer, body: Any, *args: Any, **kwargs: Any) -> Any:
        if "causal_released" in (kwargs.get("headers") or {}):
            raise ConnectionError("broker went away")
        return real_publish(self, body, *args, **kwargs)

    monkeypatch.setattr(Producer, "publish", refusing)


def test_a_broker_failure_while_releasing_leaves_the_leaders_success_standing(
    causal_store: CausalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a parked follower, and a broker that refuses every release publish
    h = Harness(causal_store)
    h.send("f", "L")
    h.run_until(lambda: causal_store.count_followers("events", h.id("L")) == 1, "park")
    refuse_releases(monkeypatch)
    # When the leader succeeds and its release fails
    leader = h.send("L")
    with h.worker():
        # Then the leader's success stands: its body ran once and its value is its result
        assert leader.get(timeout=30) == "L"
    assert h.ran == ["L"]
    # and the follower is still in the table, claimed, for the sweep
    (row,) = causal_store.list_followers("events", h.id("L"), 10)
    assert row.claimed_at is not None
    # which republishes it once the broker is back and the claim is older than the timeout
    monkeypatch.undo()
    age(causal_store, runtime_for(h.app).settings.release_timeout + 1)
    assert runtime_for(h.app).sweep().released == 1
    h.run_until(lambda: "f" in h.ran, "the follower")
    assert h.ran == ["L", "f"]


def test_a_duplicate_whose_release_fails_is_still_skipped(
    causal_store: CausalStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two parked followers released one per batch, and a broker refusing releases
    h = Harness(causal_store, causal_batch_size=1)
    h.send("f1", "L", occurred=time.time() - 2)
    h.send("f2", "L")
    h.run_until(lambda: causal_store.count_followers("events", h.id("L")) == 2, "park")
    refuse_releases(monkeypatch)
    leader = h.send("L")
    with h.worker():
        assert leader.get(timeout=30) == "L"  # f1 claimed and refused; f2 still waiting
        # When the leader is delivered again, and releasing what it left fails too
        h.send("L")
        h.send("marker")
        wait_for(lambda: "marker" in h.ran, 30, "marker")
    # Then the duplicate was skipped, and its result is still the first run's success
    assert h.ran == ["L", "marker"]
    assert leader.state == "SUCCESS" and leader.get(timeout=5) == "L"
    # Both failed releases were reported, the first run's and the duplicate's
    failed = [r for r in caplog.records if "could not all be released" in r.getMessage()]
    assert [r.getMessage().startswith("duplicate of task") for r in failed] == [False, True]
    assert causal_store.count_followers("events", h.id("L")) == 0  # both claimed
    # and the sweep republishes both once the broker is back
    monkeypatch.undo()
    age(causal_store, runtime_for(h.app).settings.release_timeout + 1)
    assert runtime_for(h.app).sweep().released == 2
    h.run_until(lambda: "f2" in h.ran and "f1" in h.ran, "the followers")
    assert h.ran == ["L", "marker", "f1", "f2"]


def test_a_follower_sent_with_its_own_serializer_runs_with_its_arguments_once_released(
    causal_store: CausalStore,
) -> None:
    # Given an app that accepts pickle as well as JSON, and a follower sent pickled
    # (apply_async(serializer="pickle")): an argument JSON cannot carry, which the worker
    # decodes and would run with at once had the follower not had to wait
    h = Harness(
        causal_store,
        accept_content=["json", "pickle"],
        result_serializer="pickle",  # the body returns its argument
        result_accept_content=["json", "pickle"],
    )
    follower = h.event.apply_async(
        (frozenset({"a", "b"}),),
        task_id=h.id("follower"),
        follows=h.id("leader"),
        serializer="pickle",
    )
    h.run_until(
        lambda: causal_store.count_followers("events", h.id("leader")) == 1 or follower.ready(),
        "the follower's park",
    )
    # When its leader succeeds
    h.send("leader")
    h.run_until(lambda: follower.ready(), "the follower's outcome")
    # Then the follower ran, with the argument it was sent with
    assert follower.successful(), follower.result
    assert h.ran == ["leader", frozenset({"a", "b"})]
