"""Random interleavings of the protocol's steps, checked against a model after every step.

Each rule is one atomic store operation by some worker; splitting "check" from "park" and
"record an outcome" from "claim" lets Hypothesis interleave them the way concurrent workers
do, with time passing, housekeeping, failures, chains whose first task never comes, and a
ring of followers that wait for each other. The model predicts every outcome; the
invariants are the ones the product promises:

- safety: no follower is handed out before its leader's outcome is recorded, unless the
  sweep releases it (lost, or the first of a ring); no parked row is handed out twice;
  outcomes are never resurrected;
- liveness: no follower stays waiting once its leader's outcome is recorded and that
  leader's release has finished (nothing is left stranded for the sweep), and every row
  is released in the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from celery_causal.sql import PostgresStore, SQLStore
from celery_causal.store import CausalStore, ClaimedFollower, ParkOutcome
from celery_causal.testing import MemoryStore
from tests.helpers import age, follower
from tests.integration.machines import run_on_sql

LEADERS = [f"L{i}" for i in range(3)]
# F0 and F1 lead followers of their own (G0, G1): a chain whose first task may never come.
# R0 and R1 follow each other: a ring only the sweep can break.
FOLLOWERS = (
    {f"F{i}": LEADERS[i % 3] for i in range(6)}
    | {"G0": "F0", "G1": "F1"}
    | {"R0": "R1", "R1": "R0"}
)
MIDDLE = ["F0", "F1", "R0", "R1"]
LOOKBACKS = (100.0, 200.0)  # two apps sharing the store, each with its own lookback
TTL, TIMEOUT, STEP = 200.0, 50.0, 30.0


@dataclass
class Row:
    state: str  # "waiting" or "releasing"
    lookback: float
    waited: float = 0.0  # since the park or the last restart
    claimed_age: float = 0.0
    #: Its leader's outcome was recorded while it waited: the leader must release it.
    leader_settled: bool = False

    @property
    def due(self) -> bool:
        return self.state == "waiting" and self.waited > self.lookback


@dataclass
class Model:
    rows: dict[str, Row] = field(default_factory=dict)
    #: task id -> (age of its outcome record, whether it failed)
    outcome: dict[str, tuple[float, bool]] = field(default_factory=dict)
    #: SQL stores: leader id -> age of the last park that marked its row "waited for"
    mark_age: dict[str, float] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # read "leader not done", about to park
    completing: set[str] = field(default_factory=set)  # outcome recorded, about to claim
    row_releases: dict[str, int] = field(default_factory=dict)  # rows handed out to run
    rows_created: dict[str, int] = field(default_factory=dict)
    released_early: list[str] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)  # followers handed out, at least once
    recorded: set[str] = field(default_factory=set)  # tasks that recorded an outcome
    #: leader id -> age of the record whose release the sweep takes over after TIMEOUT
    release_due: dict[str, float] = field(default_factory=dict)

    def settled(self, task_id: str) -> bool | None:
        """None: no outcome within the TTL; False: done; True: failed."""
        record = self.outcome.get(task_id)
        return None if record is None or record[0] >= TTL else record[1]

    def grant(self, fid: str, kind: str) -> None:
        """The follower is handed out: "direct" (its leader's outcome seen), or its row was
        handed out by a "claim" (its leader), the "sweep" (lost) or a "ring" break."""
        self.ran.add(fid)
        if kind != "direct":
            self.row_releases[fid] = self.row_releases.get(fid, 0) + 1
        leader = FOLLOWERS[fid]
        # A claim is made by the leader after its record, however long ago (the record
        # may have expired since); a direct grant relies on reading the record now.
        if kind == "claim":
            early = leader not in self.recorded
        elif kind == "direct":
            early = self.settled(leader) is None
        else:
            early = False
        if early:
            self.released_early.append(fid)


class Protocol(RuleBasedStateMachine):
    store: CausalStore
    #: Whether the store keeps "waited for" marks that expire_done also counts (SQL).
    marks = True
    #: Whether a claim restarts the lookback behind the claimed rows (PostgreSQL), or
    #: their deletion once published does (SQLite, memory).
    restart_at_claim = False

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    @rule(fid=st.sampled_from(sorted(FOLLOWERS)))
    def deliver(self, fid: str) -> None:
        """A worker receives the follower (first or duplicate delivery) and checks."""
        leader = FOLLOWERS[fid]
        lookup = self.store.lookup("s", [leader])
        state = self.model.settled(leader)
        assert (leader in lookup.done, leader in lookup.failed) == (
            state is False,
            state is True,
        )
        if state is None:
            self.model.checked.add(fid)
        else:
            self.model.grant(fid, "direct")  # runs, or fails without running

    @precondition(lambda self: self.model.checked)
    @rule(data=st.data(), lookback=st.sampled_from(LOOKBACKS))
    def park(self, data: st.DataObject, lookback: float) -> None:
        self._park(data.draw(st.sampled_from(sorted(self.model.checked))), lookback)

    def _park(self, fid: str, lookback: float) -> None:
        self.model.checked.discard(fid)
        leader = FOLLOWERS[fid]
        outcome = self.store.park(follower(fid, leader, scope="s"), lookback)
        state = self.model.settled(leader)
        if fid in self.model.rows:
            # An earlier delivery's row is its releaser's; one being released says so.
            releasing = self.model.rows[fid].state == "releasing"
            expected = ParkOutcome.RELEASING if releasing else ParkOutcome.PARKED
        elif state is not None:
            expected = ParkOutcome.LEADER_FAILED if state else ParkOutcome.LEADER_DONE
            self.model.grant(fid, "direct")
        else:
            expected = ParkOutcome.PARKED
        if state is None:
            self.model.mark_age[leader] = 0.0
            self.model.release_due.pop(leader, None)  # an expired outcome's release
            self.model.outcome.pop(leader, None)  # an expired outcome becomes the mark
            if fid not in self.model.rows:
                self.model.rows[fid] = Row("waiting", lookback)
                self.model.rows_created[fid] = self.model.rows_created.get(fid, 0) + 1
        assert outcome is expected

    @rule(chain=st.sampled_from([("G0", "F0"), ("G1", "F1"), ("R0", "R1")]))
    def reversed_chain_arrives(self, chain: tuple[str, str]) -> None:
        """A follower and then its leader (itself a follower) arrive; each checks and parks."""
        for fid in chain:
            self.deliver(fid)
            if fid in self.model.checked:
                self._park(fid, LOOKBACKS[0])

    @rule(
        leader=st.sampled_from(LEADERS),
        limit=st.integers(0, 3),
        failed=st.booleans(),
        data=st.data(),
    )
    def record(self, leader: str, limit: int, failed: bool, data: st.DataObject) -> None:
        """The leader succeeds or fails for good: its record, and the first followers
        claimed with it."""
        self._record(leader, limit, failed, data)

    def _record(self, leader: str, limit: int, failed: bool, data: st.DataObject) -> None:
        record = self.store.record_done_and_claim(
            "s", leader, limit, failed=failed, seen_ttl=TTL, release_timeout=TIMEOUT
        )
        waiting = self._waiting_for(leader)
        if waiting:
            self.model.release_due[leader] = 0.0
        # "Nothing waited" must be true: the runtime then skips the claim.
        assert record.waited or not waiting
        assert [c.follower_id for c in record.claimed] == waiting[:limit]
        # "Complete" must be true: the runtime then claims no more.
        assert not record.complete or len(record.claimed) == len(waiting)
        self.model.outcome[leader] = (0.0, failed)
        self.model.recorded.add(leader)
        self.model.mark_age.pop(leader, None)  # the row holds an outcome now
        for fid in waiting:
            self.model.rows[fid].leader_settled = True
        self._take(record.claimed, "claim", data)
        if record.waited and not record.complete:
            self.model.completing.add(leader)

    @precondition(lambda self: any(f in self.model.ran for f in MIDDLE))
    @rule(limit=st.integers(0, 3), failed=st.booleans(), data=st.data())
    def middle_done(self, limit: int, failed: bool, data: st.DataObject) -> None:
        """A follower that was handed out ends: it records its outcome, as any leader does."""
        fid = data.draw(st.sampled_from([f for f in MIDDLE if f in self.model.ran]))
        self._record(fid, limit, failed, data)

    @precondition(lambda self: self.model.completing)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        leader = data.draw(st.sampled_from(sorted(self.model.completing)))
        self.model.completing.discard(leader)
        claimed = self.store.claim_followers("s", leader, 100)
        assert [c.follower_id for c in claimed] == self._waiting_for(leader)
        self._take(claimed, "claim", data)

    def _waiting_for(self, leader: str) -> list[str]:
        # In release order: every follower here occurred at the same time, ties by id.
        return sorted(
            f for f, r in self.model.rows.items() if FOLLOWERS[f] == leader and r.state == "waiting"
        )

    def _take(self, claimed: list[ClaimedFollower], kind: str, data: st.DataObject) -> None:
        for c in claimed:
            row = self.model.rows[c.follower_id]
            # A stuck row was handed out when first claimed; its republish is the same one.
            if row.state == "waiting":
                self.model.grant(c.follower_id, kind)
            row.state, row.claimed_age = "releasing", 0.0
        fids = [c.follower_id for c in claimed]
        if self.restart_at_claim:
            self._restart_behind(fids)
        if claimed and data.draw(st.booleans()):  # published and deleted, or the releaser died
            self.store.finish(claimed)
            for fid in fids:
                del self.model.rows[fid]
            if not self.restart_at_claim:
                self._restart_behind(fids)

    def _restart_behind(self, released: list[str]) -> None:
        """Followers of released rows start their lookback again: their leader has come.

        Not those of a released follower whose outcome is recorded already: it governs them.
        """
        for f, row in self.model.rows.items():
            leader = FOLLOWERS[f]
            if row.state == "waiting" and leader in released and leader not in self.model.outcome:
                row.waited = 0.0

    @rule(data=st.data())
    def sweep(self, data: st.DataObject) -> None:
        lost = self.store.claim_lost(TIMEOUT, 100)
        # Not lost while its leader is itself parked: the sweep never runs a chain's later
        # task beside an earlier one that came.
        rows = self.model.rows
        expected = sorted(
            f
            for f, r in rows.items()
            if (r.due and FOLLOWERS[f] not in rows)
            or (r.state == "releasing" and r.claimed_age > TIMEOUT)
        )
        assert sorted(f.follower_id for f in lost) == expected
        self._take(lost, "sweep", data)
        # Followers of a leader whose release is overdue (it died after its record).
        orphans = self.store.claim_orphans(100)
        overdue = {t for t, a in self.model.release_due.items() if a > TIMEOUT}
        expected = sorted(
            f for f, r in rows.items() if r.state == "waiting" and FOLLOWERS[f] in overdue
        )
        assert sorted(f.follower_id for f in orphans) == expected
        self._take(orphans, "claim", data)
        for leader in overdue:
            self.model.completing.discard(leader)  # the sweep finished its release
            if not self._waiting_for(leader):
                del self.model.release_due[leader]
        # The ring R0 <-> R1 (both parked, one of them due) gives up R0, once it is due.
        broken = self.store.claim_cycles(100)
        ring = {"R0", "R1"}
        in_ring = ring <= set(self.model.rows) and any(self.model.rows[f].due for f in ring)
        expected = ["R0"] if in_ring and self.model.rows["R0"].due else []
        assert [f.follower_id for f in broken] == expected
        # Due rows held back by a parked leader and in no ring wait a lookback more.
        for f, r in rows.items():
            if r.due and FOLLOWERS[f] in rows and not (f in ring and ring <= set(rows)):
                r.waited = 0.0
        self._take(broken, "ring", data)

    @rule(steps=st.integers(1, 4))
    def time_passes(self, steps: int) -> None:
        elapsed = steps * STEP
        age(self.store, elapsed)
        for row in self.model.rows.values():
            row.waited += elapsed
            row.claimed_age += elapsed
        for task_id, (at, failed) in self.model.outcome.items():
            self.model.outcome[task_id] = (at + elapsed, failed)
        for ages in (self.model.mark_age, self.model.release_due):
            for task_id in ages:
                ages[task_id] += elapsed

    @rule()
    def expire(self) -> None:
        expired = self.store.expire_done(TTL, 100)
        referenced = {FOLLOWERS[f] for f in self.model.rows}
        # An outcome or a mark goes only once no follower row references it.
        old = [t for t, (at, _) in self.model.outcome.items() if at >= TTL and t not in referenced]
        old_marks = [t for t, a in self.model.mark_age.items() if a >= TTL and t not in referenced]
        assert expired == len(old) + (len(old_marks) if self.marks else 0)
        for task_id in old:
            del self.model.outcome[task_id]
            self.model.release_due.pop(task_id, None)
        for task_id in old_marks:
            del self.model.mark_age[task_id]

    @invariant()
    def safe_and_live(self) -> None:
        m = self.model
        stats = {s.scope: s for s in self.store.stats(TIMEOUT)}
        waiting = sum(1 for r in m.rows.values() if r.state == "waiting")
        releasing = len(m.rows) - waiting
        got = stats.get("s")
        assert (got.waiting if got else 0, got.releasing if got else 0) == (waiting, releasing)
        for fid, handed_out in m.row_releases.items():  # each parked row released once
            assert handed_out <= m.rows_created.get(fid, 0), f"{fid} released twice"
        assert not m.released_early, f"released before their leader: {m.released_early}"
        for task_id in LEADERS + MIDDLE:  # outcomes never resurrected
            lookup = self.store.lookup("s", [task_id])
            state = m.settled(task_id)
            assert (task_id in lookup.done, task_id in lookup.failed) == (
                state is False,
                state is True,
            )
        # Liveness: a follower whose leader recorded its outcome while it waited is not
        # left waiting once that leader's release is over.
        stranded = [
            f
            for f, r in m.rows.items()
            if r.state == "waiting" and r.leader_settled and FOLLOWERS[f] not in m.completing
        ]
        assert not stranded, f"stranded behind a leader that finished: {stranded}"

    def teardown(self) -> None:
        # Every follower still parked is released once its leader is done or it is lost.
        for leader in LEADERS + MIDDLE:
            self.store.record_done("s", leader, seen_ttl=TTL)
            self.store.finish(self.store.claim_followers("s", leader, 100))
        age(self.store, 10 * max(LOOKBACKS))
        self.store.finish(self.store.claim_lost(TIMEOUT, 100))
        assert self.store.stats(TIMEOUT) == []


def test_protocol_on_the_memory_store() -> None:
    class OnMemory(Protocol):
        marks = False

        def __init__(self) -> None:
            super().__init__()
            self.store = MemoryStore(clock=lambda: 1_700_000_000.0)

    OnMemory.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    OnMemory.TestCase().runTest()


def _claim_restarts(store: SQLStore) -> dict[str, bool]:
    return {"restart_at_claim": isinstance(store, PostgresStore)}


@pytest.mark.timeout(600)
def test_protocol_on_postgresql(pg_url: str) -> None:
    run_on_sql(Protocol, pg_url, 150, _claim_restarts)


@pytest.mark.timeout(600)
def test_protocol_on_sqlite(tmp_path: Path) -> None:
    run_on_sql(
        Protocol,
        f"sqlite:///{tmp_path / 'causal.sqlite3'}",
        150,
        _claim_restarts,
    )
