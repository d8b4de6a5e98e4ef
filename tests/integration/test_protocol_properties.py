"""Random interleavings of the protocol's steps, checked against a model after every step.

Each rule is one atomic store operation by some worker; splitting "check" from "park" and
"record done" from "claim" lets Hypothesis interleave them the way concurrent workers do.
The model predicts every outcome; the invariants are the ones the product promises: no
follower lost, none released twice, none released before its leader unless its lookback
expired, and done records never resurrected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from celery_causal.memory_store import MemoryStore
from celery_causal.sql_store import SQLStore
from celery_causal.store import CausalStore, ClaimedFollower, ParkOutcome
from tests.helpers import age, follower, truncate

LEADERS = [f"L{i}" for i in range(3)]
# F0 and F1 lead followers of their own (G0, G1): a chain whose first task may never come.
FOLLOWERS = {f"F{i}": LEADERS[i % 3] for i in range(6)} | {"G0": "F0", "G1": "F1"}
MIDDLE = ["F0", "F1"]
LOOKBACK, TTL, TIMEOUT, STEP = 100.0, 200.0, 50.0, 30.0


@dataclass
class Row:
    state: str  # "waiting" or "releasing"
    parked_age: float = 0.0
    claimed_age: float = 0.0


@dataclass
class Model:
    rows: dict[str, Row] = field(default_factory=dict)
    done_age: dict[str, float] = field(default_factory=dict)  # task id -> age of record
    # SQL stores: leader id -> age of the last park that marked its row "waited for"
    mark_age: dict[str, float] = field(default_factory=dict)
    # SQL stores: leaders whose row a park marked, as long as that row exists
    marked: set[str] = field(default_factory=set)
    checked: set[str] = field(default_factory=set)  # read "leader not done", about to park
    completing: set[str] = field(default_factory=set)  # done recorded, about to claim
    row_releases: dict[str, int] = field(default_factory=dict)  # rows handed out to run
    rows_created: dict[str, int] = field(default_factory=dict)
    released_early: list[str] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)  # followers handed out to run, at least once
    recorded: set[str] = field(default_factory=set)  # tasks that recorded done at least once

    def leader_done(self, task_id: str) -> bool:
        return self.done_age.get(task_id, TTL + 1) < TTL

    def grant(self, fid: str, kind: str) -> None:
        """The follower may run: "direct" (leader seen done), or its row was handed out by
        a "takeback" (its own park), a "claim" (its leader) or the "sweep" (lookback)."""
        self.ran.add(fid)
        if kind != "direct":
            self.row_releases[fid] = self.row_releases.get(fid, 0) + 1
        leader = FOLLOWERS[fid]
        # A claim is made by the leader after its record, however long ago (the record
        # may have expired since); the others rely on reading the record now.
        early = leader not in self.recorded if kind == "claim" else not self.leader_done(leader)
        if kind != "sweep" and early:
            self.released_early.append(fid)


class Protocol(RuleBasedStateMachine):
    store: CausalStore
    #: Whether the store keeps "waited for" marks that expire_done also counts (SQL).
    marks = True

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    @rule(fid=st.sampled_from(sorted(FOLLOWERS)))
    def deliver(self, fid: str) -> None:
        """A worker receives the follower (first or duplicate delivery) and checks."""
        leader = FOLLOWERS[fid]
        done = self.store.lookup("s", [leader], TTL).done
        assert (leader in done) == self.model.leader_done(leader)
        if leader in done:
            self.model.grant(fid, "direct")
        else:
            self.model.checked.add(fid)

    @precondition(lambda self: self.model.checked)
    @rule(data=st.data())
    def park(self, data: st.DataObject) -> None:
        fid = data.draw(st.sampled_from(sorted(self.model.checked)))
        self.model.checked.discard(fid)
        leader = FOLLOWERS[fid]
        outcome = self.store.park(follower(fid, leader, scope="s"), LOOKBACK, TTL)
        if self.model.leader_done(leader):
            # A row from an earlier delivery is its releaser's; otherwise run now.
            expected = ParkOutcome.PARKED if fid in self.model.rows else ParkOutcome.LEADER_DONE
            if expected is ParkOutcome.LEADER_DONE:
                self.model.grant(fid, "direct")
        else:
            expected = ParkOutcome.PARKED
            self.model.mark_age[leader] = 0.0
            self.model.marked.add(leader)
            if self.marks:  # an expired done record becomes the mark
                self.model.done_age.pop(leader, None)
            if fid not in self.model.rows:
                self.model.rows[fid] = Row("waiting")
                self.model.rows_created[fid] = self.model.rows_created.get(fid, 0) + 1
        assert outcome is expected

    @rule(leader=st.sampled_from(LEADERS), limit=st.integers(0, 3), data=st.data())
    def record_done(self, leader: str, limit: int, data: st.DataObject) -> None:
        """The leader succeeds: its done record, and the first followers claimed with it."""
        self._record(leader, limit, data)

    def _record(self, leader: str, limit: int, data: st.DataObject) -> None:
        record = self.store.record_done_and_claim("s", leader, limit)
        waiting = self._waiting_for(leader)
        if self.marks and leader not in self.model.marked:
            # Its mark expired: every follower that made it has waited a whole seen_ttl
            # (at least the lookback), so it is the sweep's; the leader claims nothing.
            assert (record.waited, record.claimed) == (False, [])
            waiting = []
        # "Nothing waited" must be true: the runtime then skips the claim.
        assert record.waited or not waiting
        assert [c.follower_id for c in record.claimed] == waiting[:limit]
        # "Complete" must be true: the runtime then claims no more.
        assert not record.complete or len(record.claimed) == len(waiting)
        self.model.done_age[leader] = 0.0
        self.model.recorded.add(leader)
        self.model.mark_age.pop(leader, None)  # the row is a done record now
        self._take(record.claimed, data)
        if record.waited and not record.complete:
            self.model.completing.add(leader)

    @precondition(lambda self: any(f in self.model.ran for f in MIDDLE))
    @rule(limit=st.integers(0, 3), data=st.data())
    def middle_done(self, limit: int, data: st.DataObject) -> None:
        """A follower that ran succeeds: it records itself done, as any leader does."""
        fid = data.draw(st.sampled_from([f for f in MIDDLE if f in self.model.ran]))
        self._record(fid, limit, data)

    @precondition(lambda self: self.model.completing)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        leader = data.draw(st.sampled_from(sorted(self.model.completing)))
        self.model.completing.discard(leader)
        claimed = self.store.claim_followers("s", leader, 100)
        assert [c.follower_id for c in claimed] == self._waiting_for(leader)
        self._take(claimed, data)

    def _waiting_for(self, leader: str) -> list[str]:
        # In release order: every follower here occurred at the same time, ties by id.
        return sorted(
            f for f, r in self.model.rows.items() if FOLLOWERS[f] == leader and r.state == "waiting"
        )

    def _take(self, claimed: list[ClaimedFollower], data: st.DataObject) -> None:
        for c in claimed:
            self.model.rows[c.follower_id] = Row("releasing", claimed_age=0.0)
            self.model.grant(c.follower_id, "claim")
        if claimed and data.draw(st.booleans()):  # published and deleted, or the releaser died
            self.store.finish([c.row_id for c in claimed])
            self._finished([c.follower_id for c in claimed])

    def _finished(self, fids: list[str]) -> None:
        for fid in fids:
            del self.model.rows[fid]
        # Their own waiting followers start their lookback again: their leader has come.
        for f, row in self.model.rows.items():
            if row.state == "waiting" and FOLLOWERS[f] in fids:
                row.parked_age = 0.0

    @rule()
    def sweep(self) -> None:
        lost = self.store.claim_lost(TIMEOUT, 100)
        # Not lost while its leader is itself parked: the sweep never runs a chain's later
        # task beside an earlier one that came.
        expected = sorted(
            f
            for f, r in self.model.rows.items()
            if (
                r.state == "waiting"
                and r.parked_age > LOOKBACK
                and FOLLOWERS[f] not in self.model.rows
            )
            or (r.state == "releasing" and r.claimed_age > TIMEOUT)
        )
        assert sorted(f.follower_id for f in lost) == expected
        for f in lost:
            row = self.model.rows[f.follower_id]
            # A stuck row was granted when first claimed; its republish is the same release.
            if row.state == "waiting":
                self.model.grant(f.follower_id, "sweep")
            self.model.rows[f.follower_id] = Row("releasing", claimed_age=0.0)
        self.store.finish([f.row_id for f in lost])
        self._finished([f.follower_id for f in lost])

    @rule(steps=st.integers(1, 4))
    def time_passes(self, steps: int) -> None:
        elapsed = steps * STEP
        age(self.store, elapsed)
        for row in self.model.rows.values():
            row.parked_age += elapsed
            row.claimed_age += elapsed
        for ages in (self.model.done_age, self.model.mark_age):
            for task_id in ages:
                ages[task_id] += elapsed

    @rule()
    def expire(self) -> None:
        expired = self.store.expire_done(TTL, 100)
        old = [t for t, a in self.model.done_age.items() if a >= TTL]
        old_marks = [t for t, a in self.model.mark_age.items() if a >= TTL]
        assert expired == len(old) + (len(old_marks) if self.marks else 0)
        for task_id in old:
            del self.model.done_age[task_id]
            self.model.marked.discard(task_id)
        for task_id in old_marks:
            del self.model.mark_age[task_id]
            self.model.marked.discard(task_id)

    @invariant()
    def nothing_lost_nothing_twice_nothing_early(self) -> None:
        m = self.model
        stats = {s.scope: s for s in self.store.stats(TIMEOUT)}
        waiting = sum(1 for r in m.rows.values() if r.state == "waiting")
        releasing = len(m.rows) - waiting
        got = stats.get("s")
        assert (got.waiting if got else 0, got.releasing if got else 0) == (waiting, releasing)
        for fid, handed_out in m.row_releases.items():  # each parked row released once
            assert handed_out <= m.rows_created.get(fid, 0), f"{fid} released twice"
        assert not m.released_early, f"released before their leader: {m.released_early}"
        for task_id in LEADERS + MIDDLE:  # done records never resurrected
            assert (task_id in self.store.lookup("s", [task_id], TTL).done) == m.leader_done(
                task_id
            )

    def teardown(self) -> None:
        # Every follower still parked is released once its leader is done or it is lost.
        for leader in LEADERS + MIDDLE:
            self.store.record_done("s", leader)
            self.store.finish([c.row_id for c in self.store.claim_followers("s", leader, 100)])
        age(self.store, 10 * LOOKBACK)
        self.store.finish([c.row_id for c in self.store.claim_lost(TIMEOUT, 100)])
        assert self.store.stats(TIMEOUT) == []


def test_protocol_on_the_memory_store() -> None:
    class OnMemory(Protocol):
        marks = False

        def __init__(self) -> None:
            super().__init__()
            self.store = MemoryStore(clock=lambda: 1_700_000_000.0)

    OnMemory.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    OnMemory.TestCase().runTest()


@pytest.mark.timeout(600)
def test_protocol_on_postgresql(pg_url: str) -> None:
    shared = SQLStore(pg_url)

    class OnPostgres(Protocol):
        def __init__(self) -> None:
            super().__init__()
            truncate(shared)
            self.store = shared

    OnPostgres.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    try:
        OnPostgres.TestCase().runTest()
    finally:
        truncate(shared)
        shared.close()
