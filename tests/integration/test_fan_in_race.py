"""Two leaders record their success at the moment their common follower parks, forced
with a barrier, on every store.

The follower's side is the worker's own decision (``CausalTask._may_run``: check, park
behind the first leader not done, check again); the leaders' side is the record and
claim the runtime makes. A claimed row is delivered again as its release publishes it
(the stored message, stamped with who released it). Whatever the interleaving, the
follower runs exactly once, and only once both records are there; nothing stays parked.
"""

from __future__ import annotations

import queue
import random
import threading
import uuid
from typing import Any

import pytest
from celery import Celery

import celery_causal
from celery_causal.errors import ReleaseInProgress
from celery_causal.payload import FOLLOWS, RELEASED, RELEASED_BY, unpack
from celery_causal.registry import runtime_for
from celery_causal.store import CausalStore, ParkOutcome
from celery_causal.tracing import arrival_from

SCOPE = "default"


class _ParkGate:
    """The store, with its first park held at a barrier the leaders' records also wait at."""

    def __init__(self, store: CausalStore, barrier: threading.Barrier) -> None:
        self._store, self._barrier, self._first = store, barrier, True

    def park(self, follower: Any, lookback: float) -> ParkOutcome:
        if self._first:
            self._first = False
            self._barrier.wait(10)
        return self._store.park(follower, lookback)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _Race:
    """One race: the follower's deliveries on one thread, each leader on its own."""

    def __init__(self, store: CausalStore, rnd: random.Random) -> None:
        self.store, self.rnd = store, rnd
        app = Celery(f"race-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
        self.barrier = threading.Barrier(3)
        celery_causal.install(app, store=_ParkGate(store, self.barrier), beat=False)  # type: ignore[arg-type]

        @celery_causal.causal_task(app, name="race.report", shared=False)
        def report() -> None: ...

        self.task, self.runtime = report, runtime_for(app)
        run = uuid.uuid4().hex[:8]
        self.leaders, self.fid = [f"{run}-a", f"{run}-b"], f"{run}-report"
        self.deliveries: queue.Queue[dict[str, Any]] = queue.Queue()
        self.deliveries.put({FOLLOWS: self.leaders})
        self.leaders_done = threading.Semaphore(0)
        self.runs, self.both_done = 0, True
        self.errors: list[BaseException] = []

    def deliver(self, headers: dict[str, Any]) -> None:
        """What a worker does with one delivery of the follower."""
        context = self.task._eager_request(self.fid, (), {}, headers, None, None, {})
        context.ignore_result = True
        arrival, depth = arrival_from(context)
        try:
            runs = self.task._may_run(self.runtime, SCOPE, arrival, depth, context)
        except ReleaseInProgress:
            self.deliveries.put(headers)  # Celery's retry: the same message, a moment later
            threading.Event().wait(0.005)
            return
        if runs:
            self.runs += 1
            done = self.store.lookup(SCOPE, self.leaders).done
            self.both_done = self.both_done and done == set(self.leaders)

    def follower_side(self) -> None:
        finished = 0
        while finished < len(self.leaders) or not self.deliveries.empty():
            if self.leaders_done.acquire(blocking=False):
                finished += 1
            try:
                headers = self.deliveries.get(timeout=0.01)
            except queue.Empty:
                continue
            self.deliver(headers)

    def leader_side(self, leader: str) -> None:
        """The leader's record and claim, at the moment the follower parks; each claimed
        row is published again as its release does (stamped), then deleted."""
        try:
            self.barrier.wait(10)
            if self.rnd.random() < 0.5:
                threading.Event().wait(self.rnd.random() / 1000)
            record = self.store.record_done_and_claim(SCOPE, leader, 100)
            claimed = list(record.claimed)
            if record.waited and not record.complete:
                claimed += self.store.claim_followers(SCOPE, leader, 100)
            for row in claimed:
                message = unpack(row, {"application/json"})
                headers = {**message.headers, RELEASED: "leader", RELEASED_BY: leader}
                self.deliveries.put(headers)
            # A released message may be delivered before its releaser deletes its row.
            threading.Event().wait(self.rnd.random() / 200)
            self.store.finish(claimed)
        finally:
            self.leaders_done.release()

    def run(self) -> None:
        def caught(step: Any, *args: Any) -> None:
            try:
                step(*args)
            except BaseException as exc:
                self.errors.append(exc)

        threads = [threading.Thread(target=caught, args=(self.follower_side,))] + [
            threading.Thread(target=caught, args=(self.leader_side, leader))
            for leader in self.leaders
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)


@pytest.mark.timeout(300)
def test_two_leaders_recording_while_their_follower_parks_run_it_once_after_both(
    store: CausalStore,
) -> None:
    rnd = random.Random(7)
    for _ in range(40):
        race = _Race(store, rnd)
        race.run()
        assert not race.errors, race.errors
        assert race.runs == 1
        assert race.both_done
        assert store.count_parked(None, None) == 0
