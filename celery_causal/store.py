"""The storage contract: a handful of atomic operations every store implements.

Three stores implement it: :class:`~celery_causal.sql.PostgresStore` and
:class:`~celery_causal.sql.SQLiteStore` (SQLAlchemy Core) and
:class:`~celery_causal.testing.MemoryStore` (tests). Each method's docstring says what is
atomic. Timestamps are epoch seconds taken from the store's own clock, so a worker with a
wrong clock cannot release or hold work early.

Why a park and a release never strand a follower: a leader *commits* its outcome record no
later than it claims its followers (:meth:`~CausalStore.record_done_and_claim`, then
:meth:`~CausalStore.claim_followers` while more may wait). A follower's
:meth:`~CausalStore.park` marks the leader's record and commits its row, then re-checks
the leader. Whichever commits second sees the other's commit: either the leader's claim
sees the row, or the follower's park sees the outcome and leaves no row waiting. A claim
and a take-back both move a row out of ``waiting`` in one statement, so exactly one wins.
Each SQL dialect argues how its statements keep this in its own module
(``sql/postgresql.py``, ``sql/sqlite.py``).

A follower of several leaders (fan-in) is parked behind one leader at a time, the first
whose outcome is not recorded, with this same handshake: it never misses the leader it
waits for, and when that leader releases it (or is found done by the park), it checks the
others again and waits for the next. Leaders finishing at once on different hosts each
record their outcome first; whichever the follower waits for then either claims its row
or is found done by the park, and the others are found done by the next check. One
message, hence one row, stands for the follower at a time, so it runs once. One more
interleaving: a released message can be delivered before its releaser deleted the row it
came from; a park of it behind the next leader then meets that row, claimed, and returns
:attr:`ParkOutcome.RELEASING` without storing anything (its releaser would delete it),
and the task parks again a moment later, once the row is gone.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: Longest task id, leader id or scope the store accepts.
MAX_ID_LENGTH = 255

#: How long an outcome answers checks unless its recorder says otherwise (causal_seen_ttl).
DEFAULT_SEEN_TTL = 1800.0


class ParkOutcome(enum.Enum):
    #: The row is stored; a release (the leader's, one already under way, or the sweep's)
    #: will publish it. The caller must not run the task.
    PARKED = "parked"
    #: The leader was done by the time of the park: no row is left waiting (none was
    #: written, or it was taken back) and the caller must run the task now.
    LEADER_DONE = "leader-done"
    #: The leader's failure was recorded by the time of the park: no row is left waiting
    #: and the caller applies ``causal_on_leader_failure`` now.
    LEADER_FAILED = "leader-failed"
    #: An earlier row of this follower is being released (claimed; its message published
    #: or about to be, its row deleted after): nothing was stored. A follower of one
    #: leader does not run (the released message does). A follower of several that one
    #: leader released, delivered before its releaser deleted the row, must park again
    #: once the row is gone: its releaser would delete whatever the park left in it.
    RELEASING = "releasing"


@dataclass(frozen=True)
class Follower:
    """A parked message: everything needed to publish it again, as it was sent."""

    scope: str
    follower_id: str
    leader_id: str
    task_name: str
    #: When the follower's event occurred (first publish, producer's clock).
    occurred_at: float
    #: The message, serialized by the task's serializer: args, kwargs, options.
    payload: bytes
    content_type: str
    content_encoding: str
    #: Worker host that parked it; events sent later about this task use it.
    hostname: str = ""
    #: The ordering key it was sent under (``ordering_key=``), for operators; ``None``.
    ordering_key: str | None = None


@dataclass(frozen=True)
class ClaimedFollower(Follower):
    """A follower claimed for release; :meth:`CausalStore.finish` deletes it once published."""

    row_id: int = 0
    parked_at: float = 0.0
    #: Claimed again by the sweep because its first releaser died mid-release.
    stuck: bool = False


@dataclass(frozen=True)
class DoneRecord:
    """What :meth:`CausalStore.record_done_and_claim` did."""

    #: A follower marked the leader before its record: there may be followers to release.
    waited: bool
    #: Followers claimed with the record, in release order (at most the limit asked for).
    claimed: list[ClaimedFollower]
    #: ``claimed`` holds every follower that was waiting: no further claim is needed.
    complete: bool


@dataclass(frozen=True)
class Lookup:
    """Which of the asked task ids succeeded or failed for good (within the seen TTL), and
    the store's clock when it answered."""

    done: frozenset[str]
    now: float
    failed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ScopeStats:
    scope: str
    #: Followers waiting for their leader.
    waiting: int
    #: Followers claimed by a releaser and not yet deleted.
    releasing: int
    #: Park time of the oldest waiting follower (store clock).
    oldest_parked_at: float | None
    #: Lost: waiting past their deadline, for a leader that is not parked itself. The next
    #: sweep releases them.
    overdue: int
    #: Releasing longer than the release timeout: their releaser died; the sweep retries.
    stuck: int = 0
    #: Moved aside because their stored message could not be read back.
    dead: int = 0


@dataclass(frozen=True)
class FollowerInfo:
    """One row of the follower table, for operators (no payload)."""

    scope: str
    follower_id: str
    leader_id: str
    task_name: str
    occurred_at: float
    parked_at: float
    claimed_at: float | None
    #: The ordering key it was sent under, or ``None``.
    ordering_key: str | None


@dataclass(frozen=True)
class KeyTail:
    """The newest task recorded under an ordering key (:meth:`CausalStore.record_key`)."""

    scope: str
    key: str
    task_id: str
    #: The task it follows: the key's newest task before it, ``None`` if the key was free.
    previous: str | None
    #: When it was recorded (store clock).
    recorded_at: float


@dataclass(frozen=True)
class ParkedFollower(FollowerInfo):
    """One row of the follower table whole, for an operator looking at one follower."""

    #: How long it waits for its leader (the lookback of the app that parked it).
    lookback: float
    #: When the sweep may release it as lost, unless its leader is parked itself.
    deadline: float
    hostname: str
    content_type: str
    content_encoding: str
    payload: bytes

    def as_follower(self) -> Follower:
        return Follower(
            scope=self.scope,
            follower_id=self.follower_id,
            leader_id=self.leader_id,
            task_name=self.task_name,
            occurred_at=self.occurred_at,
            payload=self.payload,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            hostname=self.hostname,
            ordering_key=self.ordering_key,
        )


class CausalStore(Protocol):
    """Atomic operations on the follower table and the done records."""

    def create_schema(self) -> list[str]:
        """Create missing tables and indexes, drop obsolete ones; return what was done, a
        line each ("created index ...", "dropped index ... (obsolete)"; idempotent)."""

    def missing_tables(self) -> list[str]:
        """Tables of the schema that do not exist; creates nothing (no SQLite file either)."""

    def lookup(self, scope: str, task_ids: Sequence[str]) -> Lookup:
        """Which of ``task_ids`` have an unexpired done or failed record; the store's clock."""

    def park(self, follower: Follower, lookback: float) -> ParkOutcome:
        """Store ``follower`` as waiting unless its leader's outcome is recorded.

        The row's deadline is the store's clock plus ``lookback``: the sweep may release it
        as lost from then on. Returns ``LEADER_DONE`` or ``LEADER_FAILED`` (no row left
        waiting) when the leader's record is there. A duplicate leaves one row and returns
        ``PARKED``: whoever releases that row (the leader whose record found it, or the
        sweep) publishes it; ``RELEASING`` if that row is claimed for release already.
        """

    def record_done(
        self,
        scope: str,
        task_id: str,
        *,
        failed: bool = False,
        seen_ttl: float = DEFAULT_SEEN_TTL,
        release_timeout: float = 60.0,
    ) -> bool:
        """Commit ``task_id``'s outcome (idempotent): done, or with ``failed`` failed for
        good; it answers checks for ``seen_ttl``, whatever the reader's own setting. Must
        be committed before claiming. If followers waited, their release is due within
        ``release_timeout``: :meth:`claim_orphans` takes it over after that.

        ``False`` means no follower of ``task_id`` parked before this record, so there is
        nothing to claim: a follower that parks later finds the record and does not park.
        ``True`` means followers may be waiting (or were, and are already released).
        """

    def record_done_and_claim(
        self,
        scope: str,
        task_id: str,
        limit: int,
        *,
        failed: bool = False,
        seen_ttl: float = DEFAULT_SEEN_TTL,
        release_timeout: float = 60.0,
    ) -> DoneRecord:
        """:meth:`record_done`, then claim up to ``limit`` of the followers it found waiting.

        The record is committed no later than the claim (PostgreSQL commits both in one
        statement). ``complete`` is ``False`` when more followers may be waiting: the
        batch was full, ``limit`` was 0, or a follower parked while the record was being
        made; the caller then goes on with :meth:`claim_followers`.
        """

    def claim_followers(self, scope: str, leader_id: str, limit: int) -> list[ClaimedFollower]:
        """Atomically move up to ``limit`` waiting followers of ``leader_id`` to releasing.

        Returned in release order. Concurrent claimers get disjoint rows.
        """

    def claim_lost(self, release_timeout: float, limit: int) -> list[ClaimedFollower]:
        """Atomically claim waiting rows past their deadline whose leader is not parked
        itself, and releasing rows whose claim is older than ``release_timeout`` (their
        releaser died). Disjoint across concurrent sweeps; returned in release order."""

    def claim_cycles(self, limit: int) -> list[ClaimedFollower]:
        """Atomically claim one row of each cycle of waiting rows past their deadline.

        Rows that follow each other in a ring (A follows B, B follows A: producer-chosen ids)
        each wait for a leader that is parked, so :meth:`claim_lost` never takes them. The
        first of each ring in release order is claimed; the rest of the ring, and anything
        parked behind it, then follow in causal order. ``limit`` bounds the rows examined.
        """

    def claim_orphans(self, limit: int) -> list[ClaimedFollower]:
        """Atomically claim up to ``limit`` waiting followers of leaders whose outcome was
        recorded more than their release timeout ago: the leader's process died before it
        claimed them all. Leaders that nothing waits for any more are forgotten here."""

    def make_due(self, scope: str, leader_id: str) -> int:
        """Set the deadline of ``leader_id``'s waiting followers to now; return how many.

        For followers the depth guard leaves to the sweep: the next sweep releases them
        instead of a lookback later.
        """

    def finish(self, rows: Sequence[ClaimedFollower]) -> None:
        """Delete released rows (after their messages were published), by row id.

        Their own waiting followers start their lookback again (deadline moved), no later
        than the rows disappear: their leader has come, and is on its way to run.
        """

    def bury(self, row: ClaimedFollower, reason: str) -> None:
        """Move a claimed row whose message cannot be read to the dead followers (idempotent)."""

    def unclaim(self, rows: Sequence[ClaimedFollower]) -> None:
        """Put claimed rows back to waiting (publishing them failed)."""

    def forget(self, scope: str, follower_id: str) -> Follower | None:
        """Atomically delete one follower's row, waiting or claimed; return the follower
        as it was stored (its task name and host name tell the result backend and the
        monitors about it), or ``None`` if no such row was there."""

    def count_followers(self, scope: str, leader_id: str) -> int:
        """How many followers of ``leader_id`` are waiting."""

    def record_key(self, scope: str, key: str, task_id: str) -> str | None:
        """Atomically make ``task_id`` the newest task of ordering key ``key``; return the
        task it follows: the key's newest task before it, or ``None`` if the key was free.

        Concurrent producers on one key serialise on its row, so each send gets the one
        before it and the sends form one chain. Recording the same task again, within
        the seen TTL (``expire_done`` forgets sends then), returns what it returned the
        first time and changes nothing (a producer re-sending)."""

    def free_key(self, scope: str, key: str, task_id: str) -> bool:
        """Free ``key`` if ``task_id`` is still its newest task (it finished, nothing was
        sent after it); whether it did. The next send then follows nothing."""

    def key_tails(self, key: str, scope: str | None = None) -> list[KeyTail]:
        """The newest task recorded under ``key`` in each scope (or in ``scope``) where the
        key is not free, by scope."""

    def expire_done(self, seen_ttl: float, limit: int) -> int:
        """Delete up to ``limit`` records that are over; return how many.

        An outcome (done or failed) goes once its own expiry passed, a mark once it is older
        than ``seen_ttl``; neither while a follower row references it. A send recorded
        under an ordering key is forgotten once older than ``seen_ttl``. Each row is tested
        again as it is deleted: a record or a mark written meanwhile stays.
        """

    def stats(self, release_timeout: float = 60.0) -> list[ScopeStats]:
        """Per scope: waiting, releasing, oldest park time, overdue, stuck in releasing."""

    def list_followers(
        self, scope: str | None, leader_id: str | None, limit: int, key: str | None = None
    ) -> list[FollowerInfo]:
        """Rows, oldest parked first, optionally of one scope, one leader, one ordering key."""

    def count_parked(self, scope: str | None, leader_id: str | None, key: str | None = None) -> int:
        """How many rows (waiting or releasing) :meth:`list_followers` would list unlimited."""

    def parked_follower(self, scope: str, follower_id: str) -> ParkedFollower | None:
        """One follower's row, waiting or releasing; ``None`` if it is not parked."""

    def claim_one(self, scope: str, follower_id: str) -> ClaimedFollower | None:
        """Claim one follower for release whatever its state (an operator's release)."""

    def scopes_of(self, follower_id: str) -> list[str]:
        """The scopes in which a follower with this id is parked."""

    def clock(self) -> float:
        """The store's clock, epoch seconds."""

    def close(self) -> None:
        """Release connections."""
