"""The ordering decision: pure functions, no I/O.

Given what the store says (which task ids are done, the database's clock) and what the
message says (its leader, when it was first published, whether a leader already released it),
decide whether a causal task runs now, parks, or is skipped as a duplicate.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Action(enum.Enum):
    RUN = "run"
    PARK = "park"
    SKIP_DUPLICATE = "skip-duplicate"
    #: The leader failed for good under ``causal_on_leader_failure="fail"``: the task ends
    #: FAILURE with ``LeaderFailed`` through Celery's own failure path, without running.
    FAIL = "fail"


#: Result-backend state and Flower state of a parked task.
DEFERRED = "DEFERRED"

#: Who released a message (header ``causal_released``) when its leader succeeded.
LEADER = "leader"
#: ... when the sweep did: the follower was lost, or the releaser of its leader died.
SWEEP = "sweep"
#: ... when an operator did.
OPERATOR = "operator"
#: ... when its leader failed for good under "fail": it fails on arrival, whatever the store
#: says by then (the failure record may have expired while the message waited in a queue).
LEADER_FAILED = "leader-failed"


@dataclass(frozen=True)
class Arrival:
    """What a delivered causal message says about its place in the order."""

    task_id: str
    #: Task id of the (first) leader this task follows, or ``None``.
    follows: str | None = None
    #: Its other leaders, when it follows several (fan-in): it runs after all succeeded.
    more: tuple[str, ...] = ()
    #: Leaders that released it on an earlier wait (fan-in): they succeeded, whatever the
    #: store says of them by now.
    seen: tuple[str, ...] = ()
    #: Who released this message ("leader", "sweep", "cycle", "operator"), once a leader,
    #: the sweep or an operator did: it must not wait again. Empty when never released.
    released: str = ""
    #: When the message was first published (producer's clock, epoch seconds). Orders
    #: releases only: a follower's wait is counted from its park, on the store's clock.
    published_at: float | None = None
    #: The broker delivered this message before (acks_late, visibility timeout, requeue).
    redelivered: bool = False
    #: The ordering key it was sent under, which it frees once it finished; or ``None``.
    key: str | None = None
    #: The leader whose outcome released it (with ``released`` "leader" or "leader-failed").
    released_by: str | None = None
    #: A follower of several leaders: when it first parked (store clock), or ``None``.
    first_parked_at: float | None = None

    @property
    def leader(self) -> str | None:
        """The (first) leader this task follows; none when it follows only itself."""
        return self.leaders[0] if self.leaders else None

    @property
    def leaders(self) -> tuple[str, ...]:
        """Every leader it follows, each once, in the order given; never itself."""
        given = (self.follows,) if self.follows is not None else ()
        return tuple(dict.fromkeys(t for t in given + self.more if t != self.task_id))


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    #: PARK: the leader to wait for (the first not done); FAIL: the leader that failed.
    leader: str | None = None
    #: PARK: every leader not done yet, for monitors.
    missing: tuple[str, ...] = ()


def decide(
    arrival: Arrival,
    done: Collection[str],
    failed: Collection[str] = (),
    on_leader_failure: str = "wait",
    now: float | None = None,
    lookback: float | None = None,
) -> Verdict:
    """Decide what to do with ``arrival``.

    ``done`` and ``failed`` hold the ids (among the task and its leaders) whose success or
    failure is recorded within the seen TTL. A follower waits while any of its leaders has
    neither, however old its message is: the time it may wait counts from its park (its
    row's deadline), never from its publish, so a broker backlog, a countdown or a store
    outage cannot make it overtake a leader. Only a release lets it run without its
    leaders' success: by the sweep or an operator, or by its leader when it has one. A
    follower of several that one leader released waits for the others that are not done;
    one the sweep released too, unless it is lost: its lookback (``lookback`` seconds
    from its first park, by the store's clock ``now``) is over. The sweep also releases
    rows whose leader succeeded but whose releaser died, and those must not run early.
    """
    if arrival.task_id in done:
        return Verdict(Action.SKIP_DUPLICATE, "already done")
    leaders = arrival.leaders
    if not leaders:
        return Verdict(Action.RUN, "no leader" if arrival.follows is None else "follows itself")
    if arrival.released == LEADER_FAILED:
        return Verdict(Action.FAIL, "leader failed", leader=arrival.released_by or leaders[0])
    missing = [t for t in leaders if t not in done and t not in arrival.seen]
    for leader in missing:
        if leader in failed and on_leader_failure == "fail" and arrival.released != OPERATOR:
            return Verdict(Action.FAIL, "leader failed", leader=leader)
    # Under "release" a failed leader counts as done; under "wait" no failure is recorded
    # by this app, so the record is another deployment's: nothing will release this
    # follower for that leader, and it counts as done too.
    missing = [t for t in missing if t not in failed]
    if not missing:
        return Verdict(Action.RUN, "leaders done" if len(leaders) > 1 else "leader done")
    if arrival.released and (arrival.released not in (LEADER, SWEEP) or len(leaders) == 1):
        return Verdict(Action.RUN, "released")
    if arrival.released == SWEEP and _lost(arrival, now, lookback):
        return Verdict(Action.RUN, "lost")
    return Verdict(Action.PARK, "leader not done", leader=missing[0], missing=tuple(missing))


def _lost(arrival: Arrival, now: float | None, lookback: float | None) -> bool:
    """A follower of several leaders has waited its whole lookback since its first park."""
    if arrival.first_parked_at is None or now is None or lookback is None:
        return True  # no park time to count from: the sweep's word stands
    return now >= arrival.first_parked_at + lookback


def needs_store(arrival: Arrival, deduplicate: str) -> bool:
    """Must the store be asked before ``arrival`` runs?

    A follower or a released message always asks (its leader, and whether it already ran).
    A task without ``follows`` asks only to catch a duplicate: on every delivery with
    ``deduplicate="always"``, only on a broker redelivery with ``"redelivered"``.
    """
    if arrival.follows is not None or arrival.released or arrival.redelivered:
        return True
    return deduplicate == "always"


def store_retry_countdown(
    retries: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before retry number ``retries + 1`` of a task that could not reach the store.

    Exponential (``base``, twice that, four times, ...) up to ``cap``, with "equal jitter":
    between half the step and the whole step. The jitter spreads the retries of the many
    tasks an outage hit, so they do not come back to a recovering database all at once;
    the lower half keeps each task from retrying in a tight loop. ``rand`` returns a float
    in [0, 1).
    """
    # 2**64 seconds is beyond any cap; the bound keeps the float from overflowing after
    # the thousands of retries of a long outage.
    step = min(cap, base * 2.0 ** min(max(retries, 0), 64))
    return step / 2 + rand() * step / 2


def may_release(depth: int, max_depth: int | None) -> bool:
    """May a task released at ``depth`` release its own followers (at ``depth + 1``)?"""
    return max_depth is None or depth + 1 <= max_depth


class _Ordered(Protocol):
    @property
    def occurred_at(self) -> float: ...

    @property
    def follower_id(self) -> str: ...


T = TypeVar("T", bound=_Ordered)


def release_order(followers: Iterable[T]) -> list[T]:
    """Followers in the order their events occurred, ties broken by follower id."""
    return sorted(followers, key=lambda f: (f.occurred_at, f.follower_id))


K = TypeVar("K", bound=Hashable)


def rings(links: Mapping[K, K]) -> list[list[K]]:
    """The cycles of a graph where each node has at most one successor (its leader).

    ``links`` maps a parked follower to its leader. A follower whose chain of leaders comes
    back to itself can never be released by a leader: each waits for one that waits too.
    Each ring is returned once, in walking order; nodes that merely lead into a ring (they
    follow one of its members) are not part of it.
    """
    found: list[list[K]] = []
    state: dict[K, int] = {}  # 1: on the current walk, 2: finished
    for start in links:
        if start in state:
            continue
        path: list[K] = []
        node: K | None = start
        while node is not None and node not in state:
            state[node] = 1
            path.append(node)
            node = links.get(node)
        if node is not None and state[node] == 1:
            found.append(path[path.index(node) :])
        for visited in path:
            state[visited] = 2
    return found
