"""celery_causal.signals: what a monitor, a test or the demo follows instead of the log."""

from __future__ import annotations

from typing import Any

from celery_causal import signals
from celery_causal.registry import runtime_for
from celery_causal.testing import MemoryStore
from tests.helpers import age
from tests.integration.harness import Harness


def test_parks_releases_and_skipped_duplicates_are_signalled_with_their_facts() -> None:
    store = MemoryStore()
    h = Harness(store, causal_lookback=60, causal_seen_ttl=120)
    seen: list[tuple[Any, ...]] = []

    def parked(sender: Any, task_id: str, leader_id: str, scope: str, **_: Any) -> None:
        seen.append(("parked", sender.name, task_id, leader_id, scope))

    def released(task_id: str, leader_id: str, scope: str, released_by: str, **_: Any) -> None:
        seen.append(("released", task_id, leader_id, scope, released_by))

    def skipped(sender: Any, task_id: str, scope: str, **_: Any) -> None:
        seen.append(("duplicate", sender.name, task_id, scope))

    signals.follower_parked.connect(parked)
    signals.follower_released.connect(released)
    signals.duplicate_skipped.connect(skipped)
    try:
        h.send("b", "a")  # parks: its leader has not run
        h.send("lost", "never")  # parks, and the sweep releases it later
        h.send("a")
        h.send("a")  # a duplicate of a finished task
        h.run_until(lambda: h.ran == ["a", "b"] and len(seen) >= 4, "a, then b")
        age(store, 61)
        runtime_for(h.app).sweep()
        h.run_until(lambda: "lost" in h.ran, "the lost follower")
    finally:
        signals.follower_parked.disconnect(parked)
        signals.follower_released.disconnect(released)
        signals.duplicate_skipped.disconnect(skipped)
    assert seen == [
        ("parked", "tests.event", h.id("b"), h.id("a"), "events"),
        ("parked", "tests.event", h.id("lost"), h.id("never"), "events"),
        ("released", h.id("b"), h.id("a"), "events", "leader"),
        ("duplicate", "tests.event", h.id("a"), "events"),
        ("released", h.id("lost"), h.id("never"), "events", "sweep"),
    ]
