"""Causal order under ``task_always_eager``: the same check, the store, no broker."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import celery_causal
from celery_causal import DEFERRED, LeaderFailed
from celery_causal.testing import MemoryStore


def eager_app(**conf: Any) -> tuple[Celery, MemoryStore, list[str], Any, Any]:
    app = Celery("eager", set_as_current=False)
    app.conf.update(task_always_eager=True, **conf)
    store = MemoryStore()
    celery_causal.install(app, store=store, beat=False)
    ran: list[str] = []

    @celery_causal.causal_task(app, name="eager.step", shared=False)
    def step(label: str) -> str:
        ran.append(label)
        return label

    @celery_causal.causal_task(app, name="eager.fails", shared=False)
    def fails(label: str) -> str:
        ran.append(label)
        raise RuntimeError(label)

    return app, store, ran, step, fails


def test_a_follower_applied_first_is_deferred_and_runs_when_its_leader_is_applied() -> None:
    _, store, ran, step, _ = eager_app()
    c = step.apply_async(("c",), task_id="c", follows="b")
    b = step.apply_async(("b",), task_id="b", follows="a")
    assert (c.state, b.state, ran) == (DEFERRED, DEFERRED, [])
    assert step.apply_async(("a",), task_id="a").get() == "a"
    assert ran == ["a", "b", "c"]
    assert store.stats() == []
    # A task recorded done is not run again
    assert step.apply_async(("a",), task_id="a").state == "IGNORED"
    assert step.apply_async(("c",), task_id="c", follows="b").state == "IGNORED"
    assert ran == ["a", "b", "c"]


def test_a_long_chain_applied_backwards_runs_in_order_without_nesting_calls() -> None:
    _, _, ran, step, _ = eager_app(causal_max_depth=None)
    n = 3000  # deeper than Python's recursion limit if releases nested
    for i in range(n, 0, -1):
        step.apply_async((f"e{i}",), task_id=f"e{i}", follows=f"e{i - 1}")
    step.apply_async(("e0",), task_id="e0")
    assert ran == [f"e{i}" for i in range(n + 1)]


def test_fail_policy_in_eager_mode() -> None:
    _, store, ran, step, fails = eager_app(causal_on_leader_failure="fail")
    parked = step.apply_async(("parked",), task_id="parked", follows="L")
    assert parked.state == DEFERRED
    leader = fails.apply_async(("L",), task_id="L")
    assert leader.state == "FAILURE"
    late = step.apply_async(("late",), task_id="late", follows="L")
    assert late.state == "FAILURE" and isinstance(late.result, LeaderFailed)
    with pytest.raises(LeaderFailed):
        late.get()
    assert ran == ["L"]  # neither follower's body ran
    assert store.stats() == []


def test_follows_given_to_apply_or_a_signature_is_checked() -> None:
    _, _, ran, step, _ = eager_app()
    assert step.s("f").set(follows="L", task_id="f").apply().state == DEFERRED
    assert step.apply(("g",), task_id="g", follows="L").state == DEFERRED
    assert ran == []
    step.apply(("L",), task_id="L")
    assert ran == ["L", "f", "g"]


def test_a_chain_longer_than_the_depth_guard_runs_to_its_end() -> None:
    # No beat runs a sweep in an eager process: the guard must not stop the chain there.
    _, store, ran, step, _ = eager_app(causal_max_depth=3)
    for i in range(10, 0, -1):
        step.apply_async((f"e{i}",), task_id=f"e{i}", follows=f"e{i - 1}")
    step.apply_async(("e0",), task_id="e0")
    assert ran == [f"e{i}" for i in range(11)]
    assert store.stats() == []


@pytest.mark.parametrize("beat", [True, False])
def test_an_app_dropped_after_install_is_freed(beat: bool) -> None:
    import gc
    import weakref

    from celery_causal.registry import runtime_for
    from celery_causal.testing import MemoryStore

    app = Celery(f"freed-{beat}", broker="memory://", set_as_current=False)
    celery_causal.install(app, store=MemoryStore(), beat=beat)

    @celery_causal.causal_task(app, shared=False)
    def step() -> None: ...

    runtime_for(app)  # its runtime is built and kept for the app
    gone = weakref.ref(app)
    del app, step
    gc.collect()
    assert gone() is None


def test_a_bound_task_sees_its_own_request_when_run_and_when_released() -> None:
    app, _, _, step, _ = eager_app()
    seen: list[tuple[str, Any]] = []

    @celery_causal.causal_task(app, name="eager.bound", bind=True, shared=False)
    def bound(self: Any) -> None:
        seen.append((self.request.id, (self.request.headers or {}).get("tenant")))

    # Given a follower applied before its leader, with a header of the caller's
    bound.apply_async(task_id="f", follows="L", headers={"tenant": "acme"})
    # When the leader runs and releases it, and a task with no leader runs at once
    step.apply_async(("L",), task_id="L")
    bound.apply_async(task_id="g", headers={"tenant": "acme"})
    # Then each body saw its own id and headers, not a request holding only its arguments
    assert seen == [("f", "acme"), ("g", "acme")]


def test_a_follower_of_several_leaders_runs_in_the_same_process_after_the_last() -> None:
    _, store, ran, step, _ = eager_app()
    report = step.apply_async(("report",), task_id="report", follows=["a", "b", "c"])
    assert report.state == DEFERRED
    step.apply_async(("b",), task_id="b")
    step.apply_async(("a",), task_id="a")
    assert ran == ["b", "a"] and store.count_parked(None, None) == 1
    step.apply_async(("c",), task_id="c")
    assert ran == ["b", "a", "c", "report"]
    assert store.count_parked(None, None) == 0
