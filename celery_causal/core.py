"""The ordering decision: pure functions, no I/O.

Given what the store says (which task ids are done, the database's clock) and what the
message says (its leader, when it was first published, whether a leader already released it),
decide whether a causal task runs now, parks, or is skipped as a duplicate.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Action(enum.Enum):
    RUN = "run"
    PARK = "park"
    SKIP_DUPLICATE = "skip-duplicate"


@dataclass(frozen=True)
class Arrival:
    """What a delivered causal message says about its place in the order."""

    task_id: str
    #: Task id of the leader this task follows, or ``None``.
    follows: str | None = None
    #: ``True`` once a leader (or the sweep) released this message: it must not wait again.
    released: bool = False
    #: When the message was first published (producer's clock, epoch seconds).
    published_at: float | None = None
    #: The broker delivered this message before (acks_late, visibility timeout, requeue).
    redelivered: bool = False

    @property
    def leader(self) -> str | None:
        """The leader to wait for: none when released, or when a task follows itself."""
        if self.released or self.follows is None or self.follows == self.task_id:
            return None
        return self.follows


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str


def decide(arrival: Arrival, done: Collection[str], now: float, lookback: float) -> Verdict:
    """Decide what to do with ``arrival``.

    ``done`` holds the ids (among the task and its leader) recorded as done within the seen
    TTL; ``now`` is the store's clock. Mirrors the seed's ``preceding_event_confirmed``:
    a follower younger than ``lookback`` whose leader is not done waits; an older one runs
    at once because its leader is not coming.
    """
    if arrival.task_id in done:
        return Verdict(Action.SKIP_DUPLICATE, "already done")
    leader = arrival.leader
    if leader is None:
        if arrival.released:
            return Verdict(Action.RUN, "released")
        if arrival.follows is not None:
            return Verdict(Action.RUN, "follows itself")
        return Verdict(Action.RUN, "no leader")
    if leader in done:
        return Verdict(Action.RUN, "leader done")
    if arrival.published_at is not None and now - arrival.published_at >= lookback:
        return Verdict(Action.RUN, "older than lookback")
    return Verdict(Action.PARK, "leader not done")


def needs_store(arrival: Arrival, deduplicate: str) -> bool:
    """Must the store be asked before ``arrival`` runs?

    A follower or a released message always asks (its leader, and whether it already ran).
    A task without ``follows`` asks only to catch a duplicate: on every delivery with
    ``deduplicate="always"``, only on a broker redelivery with ``"redelivered"``.
    """
    if arrival.follows is not None or arrival.released or arrival.redelivered:
        return True
    return deduplicate == "always"


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
