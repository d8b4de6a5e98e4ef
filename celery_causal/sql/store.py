"""What the PostgreSQL and SQLite stores share: running named statements, mapping rows,
the sweep's and the operators' queries.

Every operation is one or a few single-statement autocommit transactions, so no lock is
held across a round trip. How each dialect parks a follower and records a leader without
stranding either is argued in ``postgresql.py`` and ``sqlite.py``, the only places that
differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from sqlalchemy import Engine, inspect

from ..core import release_order, rings
from ..errors import StoreError
from ..settings import mask_url
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
from . import housekeeping as hk
from . import keys as ks
from . import statements as sql
from .engine import Compiled, Database
from .schema import create_missing, metadata, schema_objects

T = TypeVar("T")

#: Due rows held back by a parked leader that ``stats`` walks looking for rings.
_STATS_RING_LIMIT = 10_000


def by_scope(rows: Sequence[ClaimedFollower]) -> dict[str, list[int]]:
    """Row ids per scope: statements on claimed rows run once per scope, each routable."""
    grouped: dict[str, list[int]] = {}
    for row in rows:
        grouped.setdefault(row.scope, []).append(row.row_id)
    return grouped


def claimed_row(row: Sequence[Any]) -> ClaimedFollower:
    """A row of :data:`~.statements.FOLLOWER_COLUMNS` (positional: from the bare cursor)."""
    (row_id, scope, follower_id, leader_id, task_name, occurred_at, parked_at) = row[:7]
    content_type, content_encoding, payload, hostname, ordering_key = row[7:12]
    return ClaimedFollower(
        scope=scope,
        follower_id=follower_id,
        leader_id=leader_id,
        task_name=task_name,
        occurred_at=occurred_at,
        payload=bytes(payload),
        content_type=content_type,
        content_encoding=content_encoding,
        hostname=hostname,
        ordering_key=ordering_key,
        row_id=row_id,
        parked_at=parked_at,
    )


def park_values(follower: Follower, lookback: float) -> dict[str, Any]:
    """The bound parameters of a park."""
    return {
        "b_scope": follower.scope,
        "b_follower": follower.follower_id,
        "b_leader": follower.leader_id,
        "b_task": follower.task_name,
        "b_occurred": follower.occurred_at,
        "b_ctype": follower.content_type,
        "b_cenc": follower.content_encoding,
        "b_payload": follower.payload,
        "b_host": follower.hostname,
        "b_key": follower.ordering_key,
        "b_lookback": lookback,
    }


class SQLStore:
    """:class:`~celery_causal.store.CausalStore` on SQLAlchemy Core; one subclass per
    dialect (:func:`celery_causal.sql.open_store` picks it)."""

    #: This dialect's INSERT (both have ON CONFLICT).
    insert: ClassVar[Callable[..., Any]]
    #: The claims of waiting rows as this dialect runs them.
    claim_followers_sql: ClassVar[Any]
    claim_lost_sql: ClassVar[Any]
    claim_stuck_sql: ClassVar[Any]
    claim_due_one_sql: ClassVar[Any]
    claim_one_sql: ClassVar[Any]
    record_sql: ClassVar[Any]
    bury_sql: ClassVar[Any]
    record_tail_sql: ClassVar[Any]
    remember_send_sql: ClassVar[Any]

    def __init__(
        self, url: str, *, create_schema: bool = True, transaction_pooler: bool = False
    ) -> None:
        self.url = url
        self._creating = False
        #: Statements compiled for this URL's dialect, by id of the prebuilt statement.
        self._compiled: dict[int, Compiled] = {}
        # With create_schema, each process creates missing tables when it first connects.
        self._db = Database(
            url,
            on_new_engine=self._create_quietly if create_schema else None,
            transaction_pooler=transaction_pooler,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({mask_url(self.url)!r})"

    @property
    def engine(self) -> Engine:
        return self._db.engine

    # -- running statements ------------------------------------------------------------
    # The statements a task runs on every call are built once, with bound parameters, so a
    # call costs one pooled round trip and no statement construction.

    def _run(self, operation: Callable[[Any], T]) -> T:
        return self._db.run(operation)

    def _fetch(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        """Run a prebuilt statement on the fast path (see ``Database.fetch``)."""
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = self._db.compile(statement)
        return self._db.fetch(compiled, params)

    def _rowcount(self, stmt: Any, params: dict[str, Any]) -> int:
        return int(self._run(lambda c: c.execute(stmt, params).rowcount))

    def _claim(self, stmt: Any, params: dict[str, Any]) -> list[ClaimedFollower]:
        return release_order(claimed_row(row) for row in self._fetch(stmt, params))

    # -- schema --------------------------------------------------------------------------

    def _schema_lock(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        """Held while the schema is created (PostgreSQL: many processes start at once)."""
        return contextlib.nullcontext()

    def create_schema(self) -> list[str]:
        def create(conn: Any) -> list[str]:
            with self._schema_lock(conn):
                before = schema_objects(conn)
                dropped = create_missing(conn, before)
                created = sorted(schema_objects(conn) - before)
                return [f"created {item}" for item in created] + [
                    f"dropped {item} (obsolete)" for item in dropped
                ]

        self._creating = True  # the engine this may build must not create it first
        try:
            return self._run(create)
        finally:
            self._creating = False

    def missing_tables(self) -> list[str]:
        if self._db.sqlite_file_missing():
            return sorted(metadata.tables)

        def run(conn: Any) -> list[str]:
            inspector = inspect(conn)
            return [t for t in sorted(metadata.tables) if not inspector.has_table(t)]

        return self._run(run)

    def _create_quietly(self) -> None:
        # Called as a new engine appears; an unreachable database is reported by the
        # operation that follows, with the error mapping of run().
        if not self._creating:
            with contextlib.suppress(StoreError):
                self.create_schema()

    def close(self) -> None:
        self._db.close()

    # -- the protocol: what differs per dialect ------------------------------------------

    def park(self, follower: Follower, lookback: float) -> ParkOutcome:
        values = park_values(follower, lookback)
        while (state := self._park_once(values)) is None:
            # The leader's outcome was there. None: it expired meanwhile; park again.
            outcome = self._settled(follower.scope, follower.leader_id)
            if outcome is not None:
                return outcome
        return state

    def _park_once(self, values: dict[str, Any]) -> ParkOutcome | None:
        """Park with these bound values unless the leader's outcome is recorded: PARKED if
        a row waits now (this park's, or an earlier delivery's), RELEASING if an earlier
        delivery's row is claimed, ``None`` if the outcome is there. Each dialect argues
        it."""
        raise NotImplementedError

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
        raise NotImplementedError

    def finish(self, rows: Sequence[ClaimedFollower]) -> None:
        raise NotImplementedError

    # -- the protocol: shared ------------------------------------------------------------

    def lookup(self, scope: str, task_ids: Sequence[str]) -> Lookup:
        stmt = sql.lookup_statement(len(task_ids))
        params: dict[str, Any] = {"b_scope": scope}
        params.update((f"t{i}", task_id) for i, task_id in enumerate(task_ids))
        (row,) = self._fetch(stmt, params)
        done_ids = frozenset(t for i, t in enumerate(task_ids) if row[i + 1] == sql.DONE)
        failed_ids = frozenset(t for i, t in enumerate(task_ids) if row[i + 1] == sql.FAILED)
        return Lookup(done=done_ids, now=float(row[0]), failed=failed_ids)

    def _settled(self, scope: str, leader_id: str) -> ParkOutcome | None:
        """Which outcome of the leader a park ran into (one more round trip, rare); ``None``
        if it expired meanwhile, and the park must be made again."""
        lookup = self.lookup(scope, [leader_id])
        if leader_id in lookup.done:
            return ParkOutcome.LEADER_DONE
        return ParkOutcome.LEADER_FAILED if leader_id in lookup.failed else None

    def record_done(
        self,
        scope: str,
        task_id: str,
        *,
        failed: bool = False,
        seen_ttl: float = DEFAULT_SEEN_TTL,
        release_timeout: float = 60.0,
    ) -> bool:
        params = {
            "b_scope": scope,
            "b_task_id": task_id,
            "b_failed": failed,
            "b_ttl": seen_ttl,
            "b_timeout": release_timeout,
        }
        ((waited_at,),) = self._fetch(self.record_sql, params)
        return waited_at is not None

    def claim_followers(self, scope: str, leader_id: str, limit: int) -> list[ClaimedFollower]:
        params = {"b_scope": scope, "b_leader": leader_id, "b_limit": limit}
        return self._claim(self.claim_followers_sql, params)

    def record_key(self, scope: str, key: str, task_id: str) -> str | None:
        params = {"b_scope": scope, "b_key": key, "b_task": task_id}

        def run(conn: Any) -> str | None:
            # Three statements (SQLite): a second producer's steps can only come between
            # them with another task id, or with the same id, whose upsert then finds it
            # newest already and answers as the first did (see ``sql/keys.py``).
            known = conn.execute(ks.KNOWN_SEND, params).first()
            if known is not None:
                return known[0]  # type: ignore[no-any-return]
            previous = conn.execute(self.record_tail_sql, params).scalar_one()
            conn.execute(self.remember_send_sql, {**params, "b_previous": previous})
            return previous  # type: ignore[no-any-return]

        return self._run(run)

    def free_key(self, scope: str, key: str, task_id: str) -> bool:
        return self._rowcount(ks.FREE_KEY, {"b_scope": scope, "b_key": key, "b_task": task_id}) > 0

    def key_tails(self, key: str, scope: str | None = None) -> list[KeyTail]:
        stmt = ks.key_tails_statement(by_scope=scope is not None)
        params = _filter(scope, None, key)
        rows = self._run(lambda c: c.execute(stmt, params).all())
        return [KeyTail(*row) for row in rows]

    def make_due(self, scope: str, leader_id: str) -> int:
        return self._rowcount(sql.MAKE_DUE, {"b_scope": scope, "b_leader": leader_id})

    def count_followers(self, scope: str, leader_id: str) -> int:
        key = {"b_scope": scope, "b_leader": leader_id}
        return int(self._run(lambda c: c.execute(hk.COUNT_WAITING, key).scalar_one()))

    def clock(self) -> float:
        """The database's clock, epoch seconds."""
        return float(self._run(lambda c: c.execute(hk.CLOCK).scalar_one()))

    # -- the sweep -----------------------------------------------------------------------

    def claim_lost(self, release_timeout: float, limit: int) -> list[ClaimedFollower]:
        params: dict[str, Any] = {"b_timeout": release_timeout, "b_limit": limit}
        claimed = [
            dataclasses.replace(c, stuck=True) for c in self._claim(self.claim_stuck_sql, params)
        ]
        if len(claimed) < limit:
            claimed += self._claim(self.claim_lost_sql, {"b_limit": limit - len(claimed)})
        return release_order(claimed)

    def _ring_firsts(self, limit: int, postpone: bool = False) -> list[tuple[str, str]]:
        """(scope, follower id) of the first row of each ring among due rows (see core.rings).

        With ``postpone``, the candidates found in no ring are postponed (POSTPONE).
        """
        starts = self._fetch(hk.RING_CANDIDATES, {"b_limit": limit})
        if not starts:
            return []
        ids = {"b_ids": [row[0] for row in starts]}
        walked = self._run(lambda c: c.execute(hk.LEADER_WALK, ids).all())
        links = {(r[0], r[1]): (r[0], r[2]) for r in walked}
        occurred = {(r[0], r[1]): r[3] for r in walked}
        found = rings(links)
        if postpone:
            in_rings = {key for ring in found for key in ring}
            free = [row[0] for row in starts if (row[1], row[2]) not in in_rings]
            if free:
                self._rowcount(hk.POSTPONE, {"b_ids": free})
        return [min(ring, key=lambda key: (occurred[key], key[1])) for ring in found]

    def claim_cycles(self, limit: int) -> list[ClaimedFollower]:
        claimed: list[ClaimedFollower] = []
        for scope, first in self._ring_firsts(limit, postpone=True):
            params = {"b_scope": scope, "b_follower": first}
            claimed += [claimed_row(row) for row in self._fetch(self.claim_due_one_sql, params)]
        return release_order(claimed)

    def claim_orphans(self, limit: int) -> list[ClaimedFollower]:
        while self._rowcount(hk.CLEAR_RELEASES, {"b_limit": limit}) == limit:
            pass  # each round clears a batch of finished releases
        claimed: list[ClaimedFollower] = []
        for scope, leader in self._fetch(hk.ORPHANED_LEADERS, {"b_limit": limit}):
            if len(claimed) >= limit:
                break
            claimed += self.claim_followers(scope, leader, limit - len(claimed))
        return release_order(claimed)

    def expire_done(self, seen_ttl: float, limit: int) -> int:
        expired = 0
        for stmt in (hk.EXPIRE_OUTCOMES, hk.EXPIRE_MARKS, ks.EXPIRE_SENDS):
            expired += self._rowcount(stmt, {"b_ttl": seen_ttl, "b_limit": limit - expired})
            if expired >= limit:
                return expired
        # The sweep's last step: nothing of its own left to expire.
        self._tidy_counts()
        return expired

    def _tidy_counts(self) -> None:
        """Drop the scope counts that are zero, so ``status`` reads the scopes in use."""
        self._rowcount(hk.DROP_EMPTY_COUNTS, {})

    # -- operators -----------------------------------------------------------------------

    def bury(self, row: ClaimedFollower, reason: str) -> None:
        # Copy, then delete: a crash in between leaves the row claimed, the sweep claims
        # it again, and the copy's ON CONFLICT makes the second burial a no-op.
        key = {"b_scope": row.scope, "b_id": row.row_id}

        def run(conn: Any) -> None:
            conn.execute(self.bury_sql, {**key, "b_reason": reason[:2000]})
            for (follower_id,) in conn.execute(hk.REMOVE_ROW, key).all():
                conn.execute(hk.UNPOSTPONE, {"b_scope": row.scope, "b_leader": follower_id})

        self._run(run)

    def unclaim(self, rows: Sequence[ClaimedFollower]) -> None:
        for scope, row_ids in by_scope(rows).items():
            self._rowcount(sql.UNCLAIM, {"b_scope": scope, "b_ids": row_ids})

    def forget(self, scope: str, follower_id: str) -> Follower | None:
        key = {"b_scope": scope, "b_follower": follower_id}

        def run(conn: Any) -> Follower | None:
            row = conn.execute(hk.FORGET, key).first()
            if row is None:
                return None
            conn.execute(hk.UNPOSTPONE, {"b_scope": scope, "b_leader": follower_id})
            return Follower(**{**row._asdict(), "payload": bytes(row.payload)})

        return self._run(run)

    def claim_one(self, scope: str, follower_id: str) -> ClaimedFollower | None:
        key = {"b_scope": scope, "b_follower": follower_id}
        return next((claimed_row(row) for row in self._fetch(self.claim_one_sql, key)), None)

    def stats(self, release_timeout: float = 60.0) -> list[ScopeStats]:
        def run(conn: Any) -> tuple[list[Any], dict[str, int]]:
            rows = conn.execute(hk.STATS, {"b_timeout": release_timeout}).all()
            return rows, dict(conn.execute(hk.DEAD_PER_SCOPE).all())

        rows, dead = self._run(run)
        # The first of each ring is overdue too: the next sweep releases it.
        rings_of = Counter(scope for scope, _ in self._ring_firsts(_STATS_RING_LIMIT))
        for scope in sorted(set(dead) - {r[0] for r in rows}):
            rows.append((scope, 0, 0, None, 0, 0))
        rows.sort(key=lambda r: r[0])
        return [
            ScopeStats(
                scope=r[0],
                waiting=int(r[1] or 0),
                releasing=int(r[2] or 0),
                oldest_parked_at=None if r[3] is None else float(r[3]),
                overdue=int(r[4] or 0) + rings_of[r[0]],
                stuck=int(r[5] or 0),
                dead=dead.get(r[0], 0),
            )
            for r in rows
        ]

    def list_followers(
        self, scope: str | None, leader_id: str | None, limit: int, key: str | None = None
    ) -> list[FollowerInfo]:
        columns = [f.name for f in dataclasses.fields(FollowerInfo)]
        stmt = hk.list_statement(
            columns,
            by_scope=scope is not None,
            by_leader=leader_id is not None,
            by_key=key is not None,
        )
        params = _filter(scope, leader_id, key)
        params["b_limit"] = limit
        rows = self._run(lambda c: c.execute(stmt, params).all())
        return [FollowerInfo(*row) for row in rows]

    def count_parked(self, scope: str | None, leader_id: str | None, key: str | None = None) -> int:
        stmt = hk.count_statement(
            by_scope=scope is not None, by_leader=leader_id is not None, by_key=key is not None
        )
        params = _filter(scope, leader_id, key)
        return int(self._run(lambda c: c.execute(stmt, params).scalar_one()))

    def parked_follower(self, scope: str, follower_id: str) -> ParkedFollower | None:
        fields = [f.name for f in dataclasses.fields(ParkedFollower)]
        params = {"b_scope": scope, "b_follower": follower_id}
        row = self._run(lambda c: c.execute(hk.follower_statement(fields), params).first())
        if row is None:
            return None
        values = dict(zip(fields, row, strict=True))
        return ParkedFollower(**{**values, "payload": bytes(values["payload"])})

    def scopes_of(self, follower_id: str) -> list[str]:
        params = {"b_follower": follower_id}
        return list(self._run(lambda c: c.execute(hk.SCOPES_OF, params).scalars().all()))


def _filter(scope: str | None, leader_id: str | None, key: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if scope is not None:
        params["b_scope"] = scope
    if leader_id is not None:
        params["b_leader"] = leader_id
    if key is not None:
        params["b_key"] = key
    return params
