"""Random interleavings of fan-in: followers of several leaders delivered, parked behind one
leader at a time, released by leaders that succeed in any order, their rows deleted late,
time passing and sweeps, checked against a model after every step on every store.

The follower's side is the worker's own decision (``CausalTask._may_run``); a release is
the stored message delivered again with the stamp a release puts on it, its row deleted
by a separate step (a released message may be delivered first). The invariants:

- safety: a follower runs only once all its leaders succeeded, unless the sweep released
  it (lost); it runs at most once;
- nothing lost: until it runs, each follower is in exactly one place, a message on its
  way or a row waiting;
- liveness: no row waits behind a leader whose success is recorded and whose release has
  finished, and in the end every follower runs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import celery_causal
from celery_causal.errors import ReleaseInProgress
from celery_causal.payload import FOLLOWS, RELEASED, RELEASED_BY, unpack
from celery_causal.registry import runtime_for
from celery_causal.store import CausalStore, ClaimedFollower
from celery_causal.testing import MemoryStore
from celery_causal.tracing import arrival_from
from tests.helpers import age
from tests.integration.machines import run_on_sql

SCOPE = "default"
LEADERS = ["L0", "L1", "L2", "L3"]
FOLLOWERS = {"F0": ["L0", "L1"], "F1": ["L1", "L2", "L3"], "F2": ["L3", "L0"], "F3": ["L2"]}
LOOKBACK, TIMEOUT, STEP = 100.0, 50.0, 40.0


@dataclass
class Model:
    #: Messages on their way to a worker: (follower, headers).
    broker: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Rows claimed and published, not deleted yet.
    unfinished: list[ClaimedFollower] = field(default_factory=list)
    succeeded: set[str] = field(default_factory=set)
    completing: set[str] = field(default_factory=set)
    runs: dict[str, int] = field(default_factory=dict)
    early: list[str] = field(default_factory=list)


class FanIn(RuleBasedStateMachine):
    store: CausalStore

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        app = Celery(f"fan-in-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
        app.conf.causal_lookback = LOOKBACK
        celery_causal.install(app, store=self.store, beat=False)

        @celery_causal.causal_task(app, name="fanin.report", shared=False)
        def report() -> None: ...

        self.task, self.runtime = report, runtime_for(app)
        assert self.runtime.settings.lookback == LOOKBACK
        for fid in FOLLOWERS:
            self.model.broker.append((fid, {FOLLOWS: FOLLOWERS[fid]}))

    # -- a worker's delivery -----------------------------------------------------------

    @precondition(lambda self: self.model.broker)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.model.broker) - 1))
        self._deliver(n)

    def _deliver(self, n: int) -> None:
        fid, headers = self.model.broker.pop(n)
        context = self.task._eager_request(fid, (), {}, headers, None, None, {})
        context.ignore_result = True
        arrival, depth = arrival_from(context)
        try:
            runs = self.task._may_run(self.runtime, SCOPE, arrival, depth, context)
        except ReleaseInProgress:
            self.model.broker.append((fid, headers))  # Celery's retry, a moment later
            return
        if runs:
            self.store.record_done(SCOPE, fid)  # as the runtime does once it succeeded
            self.model.runs[fid] = self.model.runs.get(fid, 0) + 1
            swept = headers.get(RELEASED) == "sweep"
            if not swept and not set(FOLLOWERS[fid]) <= self.model.succeeded:
                self.model.early.append(fid)

    # -- leaders -----------------------------------------------------------------------

    def _publish(self, claimed: list[ClaimedFollower], reason: str) -> None:
        for row in claimed:
            message = unpack(row, {"application/json"})
            stamp = {RELEASED: reason, RELEASED_BY: row.leader_id}
            self.model.broker.append((row.follower_id, {**message.headers, **stamp}))
        self.model.unfinished.extend(claimed)

    @rule(leader=st.sampled_from(LEADERS), limit=st.integers(0, 2))
    def leader_succeeds(self, leader: str, limit: int) -> None:
        record = self.store.record_done_and_claim(SCOPE, leader, limit, release_timeout=TIMEOUT)
        self.model.succeeded.add(leader)
        self._publish(record.claimed, "leader")
        if record.waited and not record.complete:
            self.model.completing.add(leader)

    @precondition(lambda self: self.model.completing)
    @rule(data=st.data())
    def claim_the_rest(self, data: st.DataObject) -> None:
        self._claim_the_rest(data.draw(st.sampled_from(sorted(self.model.completing))))

    def _claim_the_rest(self, leader: str) -> None:
        self._publish(self.store.claim_followers(SCOPE, leader, 100), "leader")
        self.model.completing.discard(leader)

    @precondition(lambda self: self.model.unfinished)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """A releaser deletes a row it published (after its message may have arrived)."""
        n = data.draw(st.integers(0, len(self.model.unfinished) - 1))
        self.store.finish([self.model.unfinished.pop(n)])

    # -- time and the sweep ------------------------------------------------------------

    # A releaser finishes before time passes: a claim left past the release timeout is
    # republished by the sweep (a duplicate message), which other tests cover.
    @precondition(lambda self: not self.model.unfinished)
    @rule()
    def time_passes(self) -> None:
        age(self.store, STEP)

    @rule()
    def sweep(self) -> None:
        self._publish(self.store.claim_lost(TIMEOUT, 100), "sweep")

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def safe_whole_and_live(self) -> None:
        m = self.model
        assert not m.early, f"ran before all their leaders succeeded: {m.early}"
        assert all(n == 1 for n in m.runs.values()), f"ran twice: {m.runs}"
        waiting = [
            row for row in self.store.list_followers(SCOPE, None, 100) if row.claimed_at is None
        ]
        for fid in FOLLOWERS:
            if fid in m.runs:
                continue
            places = sum(f == fid for f, _ in m.broker)
            places += sum(row.follower_id == fid for row in waiting)
            assert places == 1, f"{fid} is in {places} places"
        stranded = [
            row.follower_id
            for row in waiting
            if row.leader_id in m.succeeded and row.leader_id not in m.completing
        ]
        assert not stranded, f"waiting behind a leader that finished: {stranded}"

    def teardown(self) -> None:
        # Every leader succeeds, releases finish, messages are delivered: all run once.
        m = self.model
        for leader in LEADERS:
            if leader not in m.succeeded:
                self.leader_succeeds(leader, 100)
        for _ in range(200):
            if m.completing:
                self._claim_the_rest(sorted(m.completing)[0])
            elif m.unfinished:
                self.store.finish([m.unfinished.pop(0)])
            elif m.broker:
                self._deliver(0)
            else:
                break
            self.safe_whole_and_live()
        assert sorted(m.runs) == sorted(FOLLOWERS) and set(m.runs.values()) == {1}
        assert self.store.stats(TIMEOUT) == []


def test_fan_in_on_the_memory_store() -> None:
    class OnMemory(FanIn):
        def __init__(self) -> None:
            self.store = MemoryStore(clock=lambda: 1_700_000_000.0)
            super().__init__()

    OnMemory.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    OnMemory.TestCase().runTest()


@pytest.mark.timeout(600)
def test_fan_in_on_postgresql(pg_url: str) -> None:
    run_on_sql(FanIn, pg_url, 80)


@pytest.mark.timeout(600)
def test_fan_in_on_sqlite(tmp_path: Path) -> None:
    run_on_sql(FanIn, f"sqlite:///{tmp_path / 'causal.sqlite3'}", 80)
