"""An in-memory store with the same atomicity as the SQL stores, under one lock."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core import release_order, rings
from ..store import (
    DEFAULT_SEEN_TTL,
    ClaimedFollower,
    DoneRecord,
    Follower,
    FollowerInfo,
    KeyTail,
    Lookup,
    ParkedFollower,
    ParkOutcome,
    ScopeStats,
)


@dataclass
class _Row:
    row_id: int
    follower: Follower
    parked_at: float
    lookback: float
    deadline: float
    claimed_at: float | None = None

    def claimed(self) -> ClaimedFollower:
        return ClaimedFollower(
            **{f.name: getattr(self.follower, f.name) for f in dataclasses.fields(Follower)},
            row_id=self.row_id,
            parked_at=self.parked_at,
        )


class MemoryStore:
    """Every operation holds one lock, so each is atomic as in the SQL store."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._rows: dict[tuple[str, str], _Row] = {}
        #: (scope, task id) -> (when its outcome expires, whether it failed)
        self._done: dict[tuple[str, str], tuple[float, bool]] = {}
        self._next_id = 1
        self._dead: dict[int, tuple[Follower, str]] = {}
        #: (scope, leader id) -> when the sweep takes over its release
        self._release_due: dict[tuple[str, str], float] = {}
        #: (scope, ordering key) -> its newest task
        self._keys: dict[tuple[str, str], KeyTail] = {}
        #: (scope, task id) -> (the task it was recorded behind, when): sends under a key
        self._sends: dict[tuple[str, str], tuple[str | None, float]] = {}

    def create_schema(self) -> list[str]:
        return []

    def missing_tables(self) -> list[str]:
        return []

    def lookup(self, scope: str, task_ids: Sequence[str]) -> Lookup:
        with self._lock:
            now = self.clock()
            outcomes = {t: self._outcome(scope, t, now) for t in task_ids}
            return Lookup(
                done=frozenset(t for t, o in outcomes.items() if o is False),
                now=now,
                failed=frozenset(t for t, o in outcomes.items() if o is True),
            )

    def _outcome(self, scope: str, task_id: str, now: float) -> bool | None:
        """``None``: no unexpired outcome; ``False``: done; ``True``: failed."""
        record = self._done.get((scope, task_id))
        if record is None or record[0] <= now:
            return None
        return record[1]

    def park(self, follower: Follower, lookback: float) -> ParkOutcome:
        key = (follower.scope, follower.follower_id)
        with self._lock:
            now = self.clock()
            leader = (follower.scope, follower.leader_id)
            outcome = self._outcome(*leader, now)
            if outcome is None:
                # The follower marks its leader, as in the SQL stores: an expired outcome
                # gives way to the mark (its release is not this one, and it no longer
                # governs the leader's followers), whether or not a row is parked already.
                self._release_due.pop(leader, None)
                self._done.pop(leader, None)
            if key in self._rows:
                # An earlier delivery's row: whoever releases it (the leader whose record
                # found it, or the sweep) publishes it; this copy does not run.
                if self._rows[key].claimed_at is not None:
                    return ParkOutcome.RELEASING
                return ParkOutcome.PARKED
            if outcome is not None:
                return ParkOutcome.LEADER_FAILED if outcome else ParkOutcome.LEADER_DONE
            self._rows[key] = _Row(
                self._next_id, follower, parked_at=now, lookback=lookback, deadline=now + lookback
            )
            self._next_id += 1
            return ParkOutcome.PARKED

    def record_done(
        self,
        scope: str,
        task_id: str,
        *,
        failed: bool = False,
        seen_ttl: float = DEFAULT_SEEN_TTL,
        release_timeout: float = 60.0,
    ) -> bool:
        with self._lock:
            now = self.clock()
            self._done[(scope, task_id)] = (now + seen_ttl, failed)
            waited = bool(self._waiting(scope, task_id))
            if waited:
                self._release_due[(scope, task_id)] = now + release_timeout
            return waited

    def _waiting(self, scope: str, leader_id: str) -> list[_Row]:
        return [
            r
            for r in self._rows.values()
            if r.claimed_at is None
            and r.follower.scope == scope
            and r.follower.leader_id == leader_id
        ]

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
        with self._lock:  # re-entrant: record and claim are one atomic step here
            if not self.record_done(
                scope, task_id, failed=failed, seen_ttl=seen_ttl, release_timeout=release_timeout
            ):
                return DoneRecord(waited=False, claimed=[], complete=True)
            claimed = self.claim_followers(scope, task_id, limit) if limit else []
            return DoneRecord(True, claimed, complete=limit > 0 and len(claimed) < limit)

    def _claim(self, rows: list[_Row], now: float, limit: int) -> list[ClaimedFollower]:
        ordered = release_order(r.claimed() for r in rows)[:limit]
        by_id = {r.row_id: r for r in rows}
        for follower in ordered:
            by_id[follower.row_id].claimed_at = now
        return ordered

    def claim_followers(self, scope: str, leader_id: str, limit: int) -> list[ClaimedFollower]:
        with self._lock:
            return self._claim(self._waiting(scope, leader_id), self.clock(), limit)

    def claim_lost(self, release_timeout: float, limit: int) -> list[ClaimedFollower]:
        with self._lock:
            now = self.clock()
            rows = [
                r
                for r in self._rows.values()
                if (r.claimed_at is None and self._lost(r, now))
                or (r.claimed_at is not None and r.claimed_at < now - release_timeout)
            ]
            stuck = {r.row_id for r in rows if r.claimed_at is not None}
            return [
                dataclasses.replace(c, stuck=c.row_id in stuck)
                for c in self._claim(rows, now, limit)
            ]

    def _leader_parked(self, row: _Row) -> bool:
        return (row.follower.scope, row.follower.leader_id) in self._rows

    def _due(self, row: _Row, now: float) -> bool:
        return row.claimed_at is None and row.deadline < now

    def _lost(self, row: _Row, now: float) -> bool:
        # Not lost while its leader is itself parked: that leader came, and waits in turn.
        return self._due(row, now) and not self._leader_parked(row)

    def _ring_firsts(self, now: float, limit: int, postpone: bool = False) -> list[_Row]:
        starts = sorted(
            (r for r in self._rows.values() if self._due(r, now) and self._leader_parked(r)),
            key=lambda r: r.deadline,
        )[:limit]
        links: dict[tuple[str, str], tuple[str, str]] = {}
        for row in starts:
            key = (row.follower.scope, row.follower.follower_id)
            while key in self._rows and key not in links:
                follower = self._rows[key].follower
                links[key] = (follower.scope, follower.leader_id)
                key = links[key]
        found = rings(links)
        if postpone:  # as the SQL store's POSTPONE
            in_rings = {key for ring in found for key in ring}
            for row in starts:
                if (row.follower.scope, row.follower.follower_id) not in in_rings:
                    row.deadline = now + row.lookback
        return [
            min(
                (self._rows[key] for key in ring),
                key=lambda r: (r.follower.occurred_at, r.follower.follower_id),
            )
            for ring in found
        ]

    def claim_cycles(self, limit: int) -> list[ClaimedFollower]:
        with self._lock:
            now = self.clock()
            claimed: list[ClaimedFollower] = []
            for first in self._ring_firsts(now, limit, postpone=True):
                if self._due(first, now):
                    claimed += self._claim([first], now, 1)
            return release_order(claimed)

    def claim_orphans(self, limit: int) -> list[ClaimedFollower]:
        with self._lock:
            now = self.clock()
            claimed: list[ClaimedFollower] = []
            for key, due in sorted(self._release_due.items(), key=lambda item: item[1]):
                if due >= now:
                    continue
                rows = self._waiting(*key)
                if not rows:
                    del self._release_due[key]  # its release is over
                elif len(claimed) < limit:
                    claimed += self._claim(rows, now, limit - len(claimed))
            return release_order(claimed)

    def make_due(self, scope: str, leader_id: str) -> int:
        with self._lock:
            now = self.clock()
            rows = [
                r
                for r in self._rows.values()
                if r.claimed_at is None
                and r.follower.scope == scope
                and r.follower.leader_id == leader_id
                and r.deadline > now
            ]
            for row in rows:
                row.deadline = now
            return len(rows)

    def _by_row_ids(self, row_ids: Sequence[int]) -> list[tuple[str, str]]:
        wanted = set(row_ids)
        return [k for k, r in self._rows.items() if r.row_id in wanted]

    def finish(self, rows: Sequence[ClaimedFollower]) -> None:
        with self._lock:
            released = set(self._by_row_ids([r.row_id for r in rows]))
            for key in released:
                del self._rows[key]
            # Their followers start their lookback again: their leader has come. A released
            # follower that already ran governs its own followers (it claimed them, or the
            # depth guard made them due): they are left alone.
            now = self.clock()
            for row in self._rows.values():
                leader = (row.follower.scope, row.follower.leader_id)
                if row.claimed_at is None and leader in released and leader not in self._done:
                    row.deadline = now + row.lookback
                    row.parked_at = now

    def bury(self, row: ClaimedFollower, reason: str) -> None:
        with self._lock:
            for key in self._by_row_ids([row.row_id]):
                self._dead.setdefault(row.row_id, (self._rows.pop(key).follower, reason))
                self._unpostpone(*key)

    def unclaim(self, rows: Sequence[ClaimedFollower]) -> None:
        with self._lock:
            for key in self._by_row_ids([r.row_id for r in rows]):
                self._rows[key].claimed_at = None

    def forget(self, scope: str, follower_id: str) -> Follower | None:
        with self._lock:
            row = self._rows.pop((scope, follower_id), None)
            if row is None:
                return None
            self._unpostpone(scope, follower_id)
            return row.follower

    def _unpostpone(self, scope: str, leader_id: str) -> None:
        # As the SQL store's UNPOSTPONE: the leader left without a release.
        for row in self._waiting(scope, leader_id):
            row.deadline = row.parked_at + row.lookback

    def count_followers(self, scope: str, leader_id: str) -> int:
        with self._lock:
            return len(self._waiting(scope, leader_id))

    def expire_done(self, seen_ttl: float, limit: int) -> int:
        # No marks here: park and record are one locked step, so nothing needs them.
        with self._lock:
            now = self.clock()
            # As in the SQL stores, an outcome stays while a follower row references it.
            referenced = {(r.follower.scope, r.follower.leader_id) for r in self._rows.values()}
            old = [
                k
                for k, (expires, _) in self._done.items()
                if expires <= now and k not in referenced
            ][:limit]
            for key in old:
                del self._done[key]
                self._release_due.pop(key, None)
            sends = [k for k, (_, at) in self._sends.items() if at < now - seen_ttl]
            sends = sends[: limit - len(old)]
            for key in sends:
                del self._sends[key]
            return len(old) + len(sends)

    def stats(self, release_timeout: float = 60.0) -> list[ScopeStats]:
        with self._lock:
            now = self.clock()
            scopes = sorted(
                {r.follower.scope for r in self._rows.values()}
                | {f.scope for f, _ in self._dead.values()}
            )
            firsts = [r for r in self._ring_firsts(now, len(self._rows)) if self._due(r, now)]
            result = []
            for scope in scopes:
                rows = [r for r in self._rows.values() if r.follower.scope == scope]
                waiting = [r for r in rows if r.claimed_at is None]
                result.append(
                    ScopeStats(
                        scope=scope,
                        waiting=len(waiting),
                        releasing=len(rows) - len(waiting),
                        oldest_parked_at=min((r.parked_at for r in waiting), default=None),
                        overdue=sum(1 for r in waiting if self._lost(r, now))
                        + sum(1 for r in firsts if r.follower.scope == scope),
                        stuck=sum(
                            1
                            for r in rows
                            if r.claimed_at is not None and r.claimed_at < now - release_timeout
                        ),
                        dead=sum(1 for f, _ in self._dead.values() if f.scope == scope),
                    )
                )
            return result

    def _matching(self, scope: str | None, leader_id: str | None, key: str | None) -> list[_Row]:
        return [
            r
            for r in self._rows.values()
            if scope in (None, r.follower.scope)
            and leader_id in (None, r.follower.leader_id)
            and key in (None, r.follower.ordering_key)
        ]

    def list_followers(
        self, scope: str | None, leader_id: str | None, limit: int, key: str | None = None
    ) -> list[FollowerInfo]:
        with self._lock:
            rows = sorted(
                self._matching(scope, leader_id, key), key=lambda r: (r.parked_at, r.row_id)
            )
            return [
                FollowerInfo(
                    scope=r.follower.scope,
                    follower_id=r.follower.follower_id,
                    leader_id=r.follower.leader_id,
                    task_name=r.follower.task_name,
                    occurred_at=r.follower.occurred_at,
                    parked_at=r.parked_at,
                    claimed_at=r.claimed_at,
                    ordering_key=r.follower.ordering_key,
                )
                for r in rows[:limit]
            ]

    def count_parked(self, scope: str | None, leader_id: str | None, key: str | None = None) -> int:
        with self._lock:
            return len(self._matching(scope, leader_id, key))

    def record_key(self, scope: str, key: str, task_id: str) -> str | None:
        with self._lock:
            known = self._sends.get((scope, task_id))
            if known is not None:
                return known[0]  # the same send recorded again
            tail = self._keys.get((scope, key))
            previous = tail.task_id if tail is not None else None
            now = self.clock()
            self._keys[(scope, key)] = KeyTail(scope, key, task_id, previous, now)
            self._sends[(scope, task_id)] = (previous, now)
            return previous

    def free_key(self, scope: str, key: str, task_id: str) -> bool:
        with self._lock:
            tail = self._keys.get((scope, key))
            if tail is None or tail.task_id != task_id:
                return False
            del self._keys[(scope, key)]
            return True

    def key_tails(self, key: str, scope: str | None = None) -> list[KeyTail]:
        with self._lock:
            found = [t for (s, k), t in self._keys.items() if k == key and scope in (None, s)]
            return sorted(found, key=lambda t: t.scope)

    def parked_follower(self, scope: str, follower_id: str) -> ParkedFollower | None:
        with self._lock:
            row = self._rows.get((scope, follower_id))
            if row is None:
                return None
            f = row.follower
            return ParkedFollower(
                scope=f.scope,
                follower_id=f.follower_id,
                leader_id=f.leader_id,
                task_name=f.task_name,
                occurred_at=f.occurred_at,
                parked_at=row.parked_at,
                claimed_at=row.claimed_at,
                ordering_key=f.ordering_key,
                lookback=row.lookback,
                deadline=row.deadline,
                hostname=f.hostname,
                content_type=f.content_type,
                content_encoding=f.content_encoding,
                payload=f.payload,
            )

    def claim_one(self, scope: str, follower_id: str) -> ClaimedFollower | None:
        with self._lock:
            row = self._rows.get((scope, follower_id))
            if row is None:
                return None
            row.claimed_at = self.clock()
            return row.claimed()

    def scopes_of(self, follower_id: str) -> list[str]:
        with self._lock:
            return sorted(scope for scope, fid in self._rows if fid == follower_id)

    def close(self) -> None:
        pass
