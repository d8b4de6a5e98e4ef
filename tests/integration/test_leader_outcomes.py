"""What a leader's outcome does to its followers, through a real Celery worker (solo pool).

A success releases them only once Celery stored it and ran its post-run hooks; a failure
for good is recorded, so that "fail" fails every follower, parked or arriving later, at
any depth, through Celery's own failure path, and "release" runs them within the depth
guard.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import signals
from celery.contrib.testing.worker import start_worker

import celery_causal
from celery_causal import LeaderFailed
from celery_causal.registry import runtime_for
from celery_causal.store import CausalStore
from tests.helpers import age, wait_for
from tests.integration.harness import Harness


class Outcomes(Harness):
    """The harness with a task that fails, an errback, and one that reads its leader."""

    def __init__(self, store: CausalStore, **conf: Any) -> None:
        super().__init__(store, **conf)
        self.errbacks: list[str] = []
        self.seen: dict[str, str] = {}

        @celery_causal.causal_task(self.app, name="tests.fails", scope="events", shared=False)
        def fails(label: str) -> str:
            self.ran.append(label)
            raise RuntimeError(f"{label} failed")

        @self.app.task(name="tests.errback", shared=False)
        def errback(request: Any, exc: Any, traceback: Any) -> None:
            self.errbacks.append(request.id)

        self.postrun_done: set[str] = set()

        @celery_causal.causal_task(self.app, name="tests.reads", scope="events", shared=False)
        def reads(label: str, leader_id: str) -> str:
            state = self.app.AsyncResult(leader_id).state
            self.seen[label] = (
                f"{state}, post-run {'done' if leader_id in self.postrun_done else 'not done'}"
            )
            self.ran.append(label)
            return label

        self.fails, self.errback, self.reads = fails, errback, reads

    def send_failing(self, label: str, follows: str | None = None) -> Any:
        return self.send(label, follows, task=self.fails)


def test_fail_policy_fails_parked_late_and_deeper_followers_without_running_them(
    causal_store: CausalStore,
) -> None:
    h = Outcomes(causal_store, causal_on_leader_failure="fail")
    # Given a follower parked behind a leader, and a follower of that follower
    parked = h.event.apply_async(
        ("parked",), task_id=h.id("parked"), follows=h.id("L"), link_error=h.errback.s()
    )
    grandchild = h.send("grandchild", "parked")
    with h.worker():
        wait_for(lambda: causal_store.count_followers("events", h.id("L")) == 1, 30, "park")
        # When the leader fails for good
        leader = h.send_failing("L")
        with pytest.raises(RuntimeError):
            leader.get(timeout=30)
        # Then the parked follower and its own follower end FAILURE with LeaderFailed
        for result in (parked, grandchild):
            with pytest.raises(LeaderFailed):
                result.get(timeout=30)
        # and so does a follower that arrives after the failure, and its follower
        late = h.send("late", "L")
        later = h.send("later", "late")
        for result in (late, later):
            with pytest.raises(LeaderFailed):
                result.get(timeout=30)
        # The errback of the parked follower ran (Celery's own failure path)
        wait_for(lambda: h.errbacks == [h.id("parked")], 30, "the errback")
    # and no follower's body ran
    assert h.ran == ["L"]
    assert sum(s.waiting + s.releasing for s in causal_store.stats()) == 0


def test_a_failure_claim_recovered_by_the_sweep_still_fails(causal_store: CausalStore) -> None:
    h = Outcomes(causal_store, causal_on_leader_failure="fail", causal_release_timeout=30)
    follower = h.send("f", "L")
    h.run_until(lambda: causal_store.count_followers("events", h.id("L")) == 1, "park")
    # Given a leader whose process died right after recording its failure and claiming
    # its follower, before publishing it
    record = causal_store.record_done_and_claim("events", h.id("L"), 100, failed=True)
    assert [f.follower_id for f in record.claimed] == [h.id("f")]
    # When the sweep republishes the stuck claim
    age(causal_store, 31)
    assert runtime_for(h.app).sweep().released == 1
    # Then the follower still fails without running
    with h.worker(), pytest.raises(LeaderFailed):
        follower.get(timeout=30)
    assert h.ran == []


def test_release_policy_runs_followers_within_the_depth_guard(
    causal_store: CausalStore,
) -> None:
    # Given a chain of failing tasks f0 <- f1 <- ... <- f4, sent backwards, max depth 2
    h = Outcomes(causal_store, causal_on_leader_failure="release", causal_max_depth=2)
    for i in range(4, 0, -1):
        h.send_failing(f"f{i}", f"f{i - 1}")
    # When f0 fails, the release cascades two generations, not further
    h.send_failing("f0")
    h.run_until(lambda: len(h.ran) >= 3, "two generations")
    assert h.ran == ["f0", "f1", "f2"]
    assert causal_store.count_followers("events", h.id("f2")) == 1
    # Then the next sweep goes on with the rest, in order
    assert runtime_for(h.app).sweep().released == 1
    h.run_until(lambda: len(h.ran) >= 5, "the rest of the chain")
    assert h.ran == ["f0", "f1", "f2", "f3", "f4"]


def test_a_follower_starts_after_its_leaders_success_is_stored_and_post_run_hooks_ran(
    causal_store: CausalStore,
) -> None:
    h = Outcomes(causal_store)
    leaders = {h.id(f"L{i}") for i in range(5)}

    def slow_postrun(task_id: str | None = None, **_: Any) -> None:
        if task_id in leaders:
            time.sleep(0.2)  # a user's post-run hook (a commit, say) that takes a while
            h.postrun_done.add(task_id)

    signals.task_postrun.connect(slow_postrun, weak=False)
    try:
        # Given followers that arrive first and read their leader's state when they run,
        # on a worker with two threads: a released follower may start while its leader's
        # thread is still in the tracer
        for i in range(5):
            h.reads.apply_async(
                (f"f{i}", h.id(f"L{i}")), task_id=h.id(f"f{i}"), follows=h.id(f"L{i}")
            )
        with start_worker(
            h.app, pool="threads", concurrency=2, perform_ping_check=False, shutdown_timeout=30
        ):
            wait_for(lambda: sum(s.waiting for s in causal_store.stats()) == 5, 30, "five parks")
            # When their leaders succeed
            for i in range(5):
                h.send(f"L{i}")
            wait_for(lambda: len(h.seen) == 5, 30, "five followers")
    finally:
        signals.task_postrun.disconnect(slow_postrun)
    # Then each saw its leader's SUCCESS stored and its post-run hook finished
    assert h.seen == {f"f{i}": "SUCCESS, post-run done" for i in range(5)}


def test_a_follower_released_by_a_failed_leader_fails_after_the_record_expired(
    causal_store: CausalStore,
) -> None:
    h = Outcomes(
        causal_store,
        causal_on_leader_failure="fail",
        causal_lookback=60,
        causal_seen_ttl=120,
        task_create_missing_queues=True,
    )
    # Given a follower bound for queue "slow", parked behind L
    follower = h.event.apply_async(("f",), task_id=h.id("f"), follows=h.id("L"), queue="slow")
    with _worker(h, "slow,celery"):
        wait_for(lambda: causal_store.count_followers("events", h.id("L")) == 1, 30, "park")
    # When L fails for good, releasing the follower back to "slow"
    leader = h.send_failing("L")
    with _worker(h, "celery"):
        with pytest.raises(RuntimeError):
            leader.get(timeout=30)
        wait_for(lambda: causal_store.stats() == [], 30, "the release")
    # and "slow" stays busy for longer than the seen TTL, while the sweep expires records
    age(causal_store, 121)
    runtime_for(h.app).sweep()
    # Then the follower, delivered at last, still fails without running
    with _worker(h, "slow"), pytest.raises(LeaderFailed):
        follower.get(timeout=30)
    assert h.ran == ["L"]


def _worker(h: Outcomes, queues: str) -> Any:
    return start_worker(
        h.app,
        pool="solo",
        concurrency=1,
        perform_ping_check=False,
        shutdown_timeout=30,
        queues=queues,
    )


def test_a_follower_the_sweep_releases_behind_a_failed_leader_fails_after_the_record_expired(
    causal_store: CausalStore,
) -> None:
    # Given a follower parked behind L, whose process died right after recording its
    # failure, before claiming the follower
    h = Outcomes(
        causal_store,
        causal_on_leader_failure="fail",
        causal_release_timeout=30,
        causal_lookback=60,
        causal_seen_ttl=120,
    )
    follower = h.send("f", "L")
    h.run_until(lambda: causal_store.count_followers("events", h.id("L")) == 1, "park")
    assert causal_store.record_done(
        "events", h.id("L"), failed=True, seen_ttl=120, release_timeout=30
    )
    # When the sweep takes over the release, and the message then waits in a busy queue
    # until the failure record expired
    age(causal_store, 31)
    assert runtime_for(h.app).sweep().released == 1
    age(causal_store, 121)
    # Then the follower still fails without running
    with h.worker(), pytest.raises(LeaderFailed):
        follower.get(timeout=30)
    assert h.ran == []
