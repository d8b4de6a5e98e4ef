"""Random interleavings of ordering-key sends, deliveries, parks, completions, key frees,
time and sweeps, checked against a model after every step.

Each rule is one step of some producer or worker, as the runtime makes it: a producer
records a send under a key (or records it and dies before publishing), a worker checks a
delivery, parks it, records its outcome with the first claim, claims the rest, frees its
key; time passes and the sweep releases lost rows. The invariants are what keys promise:

- safety: a task runs only once the task recorded before it under its key succeeded,
  unless the sweep released it (its predecessor never came within the lookback); no task
  runs twice; the store's newest task of each key is the model's;
- liveness: no task waits parked once its predecessor succeeded and finished releasing,
  a key whose newest task finished is free, and in the end every published task ran.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from celery_causal.store import CausalStore, ClaimedFollower, ParkOutcome
from celery_causal.testing import MemoryStore
from tests.helpers import age, follower
from tests.integration.machines import run_on_sql

KEYS = ("k0", "k1")
LOOKBACK, TTL, TIMEOUT, STEP = 100.0, 1e6, 50.0, 40.0


@dataclass
class Task:
    key: str
    #: The task recorded before it under its key (``None``: the key was free).
    leader: str | None
    #: "queued" (in the broker), "checked" (saw its leader not done, about to park),
    #: "parked", "running", "done", or "gap" (recorded; its producer died unpublished).
    state: str
    released_by: str = ""  # "leader" or "sweep": its message runs without a check
    parked_for: float = 0.0


@dataclass
class Model:
    tasks: dict[str, Task] = field(default_factory=dict)
    tail: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(KEYS))
    #: Finished, more followers may wait: the rest of its release is under way.
    completing: set[str] = field(default_factory=set)
    #: Finished and released: about to free its key.
    freeing: set[str] = field(default_factory=set)
    runs: dict[str, int] = field(default_factory=dict)
    early: list[str] = field(default_factory=list)

    def in_state(self, state: str) -> list[str]:
        return sorted(t for t, task in self.tasks.items() if task.state == state)


class Keys(RuleBasedStateMachine):
    store: CausalStore

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.ids = itertools.count()

    # -- producers ---------------------------------------------------------------------

    def _record(self, key: str) -> tuple[str, str | None]:
        task_id = f"t{next(self.ids)}"
        previous = self.store.record_key("s", key, task_id)
        assert previous == self.model.tail[key]
        self.model.tail[key] = task_id
        return task_id, previous

    @rule(key=st.sampled_from(KEYS))
    def send(self, key: str) -> None:
        task_id, previous = self._record(key)
        self.model.tasks[task_id] = Task(key, previous, "queued")

    @rule(key=st.sampled_from(KEYS))
    def send_and_die(self, key: str) -> None:
        """The producer recorded the send and died before publishing it."""
        task_id, previous = self._record(key)
        self.model.tasks[task_id] = Task(key, previous, "gap")

    @precondition(lambda self: self.model.tasks)
    @rule(data=st.data())
    def send_again(self, data: st.DataObject) -> None:
        """A producer sends an id again (an outbox replaying a publish): it keeps its first
        place, and the key's newest task stays what it was."""
        task_id = data.draw(st.sampled_from(sorted(self.model.tasks)))
        task = self.model.tasks[task_id]
        assert self.store.record_key("s", task.key, task_id) == task.leader

    # -- workers -----------------------------------------------------------------------

    def _run(self, task_id: str) -> None:
        task = self.model.tasks[task_id]
        task.state = "running"
        self.model.runs[task_id] = self.model.runs.get(task_id, 0) + 1
        leader = self.model.tasks.get(task.leader) if task.leader else None
        if leader is not None and leader.state != "done" and task.released_by != "sweep":
            self.model.early.append(task_id)

    @precondition(lambda self: self.model.in_state("queued"))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        self._deliver(data.draw(st.sampled_from(self.model.in_state("queued"))))

    def _deliver(self, task_id: str) -> None:
        task = self.model.tasks[task_id]
        if task.released_by or task.leader is None:
            self._run(task_id)
            return
        done = task.leader in self.store.lookup("s", [task.leader]).done
        assert done == (self.model.tasks[task.leader].state == "done")
        if done:
            self._run(task_id)
        else:
            task.state = "checked"

    @precondition(lambda self: self.model.in_state("checked"))
    @rule(data=st.data())
    def park(self, data: st.DataObject) -> None:
        self._park(data.draw(st.sampled_from(self.model.in_state("checked"))))

    def _park(self, task_id: str) -> None:
        task = self.model.tasks[task_id]
        assert task.leader is not None
        row = follower(task_id, task.leader, scope="s", ordering_key=task.key)
        outcome = self.store.park(row, LOOKBACK)
        if self.model.tasks[task.leader].state == "done":
            assert outcome is ParkOutcome.LEADER_DONE
            self._run(task_id)
        else:
            assert outcome is ParkOutcome.PARKED
            task.state, task.parked_for = "parked", 0.0

    def _released(self, claimed: list[ClaimedFollower], by: str) -> None:
        for row in claimed:
            task = self.model.tasks[row.follower_id]
            assert task.state == "parked", f"{row.follower_id} released while {task.state}"
            task.state, task.released_by = "queued", by
        self.store.finish(claimed)

    @precondition(lambda self: self.model.in_state("running"))
    @rule(data=st.data(), limit=st.integers(0, 2))
    def succeed(self, data: st.DataObject, limit: int) -> None:
        """The task's body ran: its done record, with the first of its followers claimed."""
        self._succeed(data.draw(st.sampled_from(self.model.in_state("running"))), limit)

    def _succeed(self, task_id: str, limit: int) -> None:
        record = self.store.record_done_and_claim(
            "s", task_id, limit, seen_ttl=TTL, release_timeout=TIMEOUT
        )
        self.model.tasks[task_id].state = "done"
        self._released(record.claimed, "leader")
        if record.waited and not record.complete:
            self.model.completing.add(task_id)
        else:
            self.model.freeing.add(task_id)

    @precondition(lambda self: self.model.completing)
    @rule(data=st.data())
    def release_the_rest(self, data: st.DataObject) -> None:
        self._release_the_rest(data.draw(st.sampled_from(sorted(self.model.completing))))

    def _release_the_rest(self, task_id: str) -> None:
        self._released(self.store.claim_followers("s", task_id, 100), "leader")
        self.model.completing.discard(task_id)
        self.model.freeing.add(task_id)

    @precondition(lambda self: self.model.freeing)
    @rule(data=st.data())
    def free_key(self, data: st.DataObject) -> None:
        self._free_key(data.draw(st.sampled_from(sorted(self.model.freeing))))

    def _free_key(self, task_id: str) -> None:
        key = self.model.tasks[task_id].key
        freed = self.store.free_key("s", key, task_id)
        assert freed == (self.model.tail[key] == task_id)
        if freed:
            self.model.tail[key] = None
        self.model.freeing.discard(task_id)

    # -- time and the sweep ------------------------------------------------------------

    @rule()
    def time_passes(self) -> None:
        age(self.store, STEP)
        for task in self.model.tasks.values():
            if task.state == "parked":
                task.parked_for += STEP

    @rule()
    def sweep(self) -> None:
        claimed = self.store.claim_lost(TIMEOUT, 100)
        for row in claimed:
            task = self.model.tasks[row.follower_id]
            assert task.leader is not None
            # Lost: waited past its lookback for a predecessor that is not parked itself.
            assert task.parked_for > LOOKBACK - 1e-6, f"{row.follower_id} swept early"
            assert self.model.tasks[task.leader].state != "parked"
        self._released(claimed, "sweep")

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def ordered_and_live(self) -> None:
        m = self.model
        assert not m.early, f"ran before their predecessor succeeded: {m.early}"
        assert all(n == 1 for n in m.runs.values()), f"ran twice: {m.runs}"
        for key in KEYS:
            tails = [t.task_id for t in self.store.key_tails(key, "s")]
            assert tails == ([m.tail[key]] if m.tail[key] else []), key
        stranded = [
            t
            for t, task in m.tasks.items()
            if task.state == "parked"
            and task.leader is not None
            and m.tasks[task.leader].state == "done"
            and task.leader not in m.completing
        ]
        assert not stranded, f"parked behind a predecessor that finished: {stranded}"

    def teardown(self) -> None:
        # Drive every published task to its end: each runs once, and every key whose
        # newest task was published ends free.
        m = self.model
        for _ in range(10 * len(m.tasks) + 10):
            if m.in_state("queued"):
                self._deliver(m.in_state("queued")[0])
            elif m.in_state("checked"):
                self._park(m.in_state("checked")[0])
            elif m.in_state("running"):
                self._succeed(m.in_state("running")[0], 100)
            elif m.completing:
                self._release_the_rest(sorted(m.completing)[0])
            elif m.freeing:
                self._free_key(sorted(m.freeing)[0])
            elif m.in_state("parked"):
                for _ in range(3):
                    self.time_passes()
                self.sweep()
            else:
                break
            self.ordered_and_live()
        published = [t for t, task in m.tasks.items() if task.state != "gap"]
        assert all(m.tasks[t].state == "done" for t in published), m.tasks
        gaps = {t for t, task in m.tasks.items() if task.state == "gap"}
        for key in KEYS:
            assert m.tail[key] is None or m.tail[key] in gaps
        assert self.store.stats(TIMEOUT) == []


def test_keys_on_the_memory_store() -> None:
    class OnMemory(Keys):
        def __init__(self) -> None:
            super().__init__()
            self.store = MemoryStore(clock=lambda: 1_700_000_000.0)

    OnMemory.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    OnMemory.TestCase().runTest()


@pytest.mark.timeout(600)
def test_keys_on_postgresql(pg_url: str) -> None:
    run_on_sql(Keys, pg_url, 100)


@pytest.mark.timeout(600)
def test_keys_on_sqlite(tmp_path: Path) -> None:
    run_on_sql(Keys, f"sqlite:///{tmp_path / 'causal.sqlite3'}", 100)
