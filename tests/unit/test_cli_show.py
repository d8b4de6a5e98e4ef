"""What ``celery causal show`` says of a follower's leader and release, on the memory store.

The command itself runs as a subprocess in ``tests/acceptance/test_cli.py``; these cases
set up leader outcomes a real worker would only reach through races.
"""

from __future__ import annotations

from celery import Celery

import celery_causal
from celery_causal.cli_show import story, text
from celery_causal.registry import runtime_for
from celery_causal.runtime import CausalRuntime
from celery_causal.testing import MemoryStore
from tests.helpers import follower


def runtime_with(store: MemoryStore) -> CausalRuntime:
    app = Celery("show-test", set_as_current=False)
    app.conf.causal_release_timeout = 60
    celery_causal.install(app, store=store, beat=False)
    return runtime_for(app)


def told(runtime: CausalRuntime, follower_id: str) -> dict[str, object]:
    row = runtime.store.parked_follower("default", follower_id)
    assert row is not None
    return story(runtime, row)


def test_the_leader_state_follows_what_the_store_recorded() -> None:
    store = MemoryStore()
    runtime = runtime_with(store)
    store.park(follower("f", "L"), 600)
    assert told(runtime, "f")["leader_state"] == "not-seen"
    store.record_done("default", "L", failed=True)
    assert told(runtime, "f")["leader_state"] == "failed"
    store.record_done("default", "L")
    assert told(runtime, "f")["leader_state"] == "done"
    # A follower whose leader is parked itself waits for it, whatever its deadline
    store.park(follower("g", "M"), 600)
    store.park(follower("M", "X"), 600)
    base = store.clock
    store.clock = lambda: base() + 900
    parked = told(runtime, "g")
    assert (parked["leader_state"], parked["due_in_seconds"] < 0) == ("parked", True)
    assert "released after it" in str(parked["release"])
    store.claim_one("default", "M")
    assert told(runtime, "g")["leader_state"] == "releasing"


def test_a_claim_older_than_the_release_timeout_is_shown_stuck() -> None:
    store = MemoryStore()
    runtime = runtime_with(store)
    store.park(follower("f", "L"), 600)
    assert "in 10.0m" in str(told(runtime, "f")["release"])
    store.claim_one("default", "f")
    assert (told(runtime, "f")["state"], told(runtime, "f")["stuck"]) == ("releasing", False)
    base = store.clock
    store.clock = lambda: base() + 61
    shown = told(runtime, "f")
    assert shown["stuck"] is True and "next sweep" in str(shown["release"])
    assert "state:        releasing (stuck)" in text(shown)
