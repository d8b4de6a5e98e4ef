"""The SQL store: PostgreSQL (psycopg 3) in production, SQLite as the embedded default.

Every operation is one or two single-statement autocommit transactions, so no lock is held
across a round trip. The comments on :meth:`SQLStore.park` and in ``store.py`` explain how
those statements close the park/release race.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    and_,
    case,
    delete,
    func,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .core import release_order, rings
from .errors import StoreError
from .settings import mask_url
from .sql_engine import Compiled, Database
from .sql_schema import db_clock, dead_followers, followers, metadata
from .sql_statements import (
    CLAIM_DUE_ONE,
    CLEAR_RELEASES,
    DONE,
    EXPIRE_MARKS,
    EXPIRE_OUTCOMES,
    FAILED,
    FINISH_ANY,
    FINISH_IN,
    FOLLOWER_COLUMNS,
    HAS_ROW,
    LEADER_PARKED,
    LEADER_WALK,
    LOOKUPS,
    MAKE_DUE,
    ORPHANED_LEADERS,
    POSTPONE,
    RESTART_IN,
    RING_CANDIDATES,
    TAKE_BACK,
    UNPOSTPONE,
    DialectStatements,
    lookup_statement,
)
from .store import (
    DEFAULT_SEEN_TTL,
    ClaimedFollower,
    DoneRecord,
    Follower,
    FollowerInfo,
    Lookup,
    ParkOutcome,
    ScopeStats,
    record_then_claim,
)

T = TypeVar("T")

#: Due rows held back by a parked leader that ``stats`` walks looking for rings.
_STATS_RING_LIMIT = 10_000

# Any constant: serialises concurrent CREATE TABLE from many processes starting at once.
_SCHEMA_LOCK_KEY = 0x636175736C


def _claimed(
    row_id: int,
    scope: str,
    follower_id: str,
    leader_id: str,
    task_name: str,
    occurred_at: float,
    parked_at: float,
    content_type: str,
    content_encoding: str,
    payload: bytes,
    hostname: str,
) -> ClaimedFollower:
    # Positional, in the order of FOLLOWER_COLUMNS: rows come from the bare cursor.
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
        row_id=row_id,
        parked_at=parked_at,
    )


class SQLStore:
    """:class:`~celery_causal.store.CausalStore` on SQLAlchemy Core."""

    def __init__(self, url: str, *, create_schema: bool = True) -> None:
        self.url = url
        self._creating = False
        #: Statements compiled for this URL's dialect, by id of the prebuilt statement.
        self._compiled: dict[int, Compiled] = {}
        # With create_schema, each process creates missing tables when it first connects.
        self._db = Database(url, on_new_engine=self._create_quietly if create_schema else None)
        self._insert: Callable[..., Any] = (
            sqlite.insert if url.startswith("sqlite") else postgresql.insert
        )
        self.is_postgresql = self._db.is_postgresql
        self._sql = DialectStatements(self.is_postgresql)

    def __repr__(self) -> str:
        return f"SQLStore({mask_url(self.url)!r})"

    @property
    def engine(self) -> Engine:
        return self._db.engine

    def _run(self, operation: Callable[[Any], T]) -> T:
        return self._db.run(operation)

    def _fetch(self, statement: Any, params: dict[str, Any]) -> list[Any]:
        """Run a prebuilt statement on the fast path (see ``Database.fetch``)."""
        compiled = self._compiled.get(id(statement))
        if compiled is None:
            compiled = self._compiled[id(statement)] = self._db.compile(statement)
        return self._db.fetch(compiled, params)

    def create_schema(self) -> list[str]:
        def create(conn: Any) -> list[str]:
            if self.is_postgresql:
                conn.execute(select(func.pg_advisory_lock(_SCHEMA_LOCK_KEY)))
            try:
                before = _schema_objects(conn)
                metadata.create_all(conn, checkfirst=True)
                return sorted(_schema_objects(conn) - before)
            finally:
                if self.is_postgresql:
                    conn.execute(select(func.pg_advisory_unlock(_SCHEMA_LOCK_KEY)))

        self._creating = True  # the engine this may build must not create it first
        try:
            return self._run(create)
        finally:
            self._creating = False

    def _create_quietly(self) -> None:
        # Called as a new engine appears; an unreachable database is reported by the
        # operation that follows, with the error mapping of run().
        if not self._creating:
            with contextlib.suppress(StoreError):
                self.create_schema()

    def close(self) -> None:
        self._db.close()

    # -- operations --------------------------------------------------------------------
    # The statements a task runs on every call are built once, with bound parameters, so a
    # call costs one pooled round trip and no statement construction.

    def lookup(self, scope: str, task_ids: Sequence[str]) -> Lookup:
        stmt = LOOKUPS.get(len(task_ids))
        if stmt is None:
            stmt = lookup_statement(len(task_ids))
        params: dict[str, Any] = {"b_scope": scope}
        params.update((f"t{i}", task_id) for i, task_id in enumerate(task_ids))
        (row,) = self._fetch(stmt, params)
        done_ids = frozenset(t for i, t in enumerate(task_ids) if row[i + 1] == DONE)
        failed_ids = frozenset(t for i, t in enumerate(task_ids) if row[i + 1] == FAILED)
        return Lookup(done=done_ids, now=float(row[0]), failed=failed_ids)

    def _settled(self, scope: str, leader_id: str) -> ParkOutcome | None:
        """Which outcome of the leader a park ran into (one more round trip, rare); ``None``
        if it expired meanwhile, and the park must be made again."""
        lookup = self.lookup(scope, [leader_id])
        if leader_id in lookup.done:
            return ParkOutcome.LEADER_DONE
        return ParkOutcome.LEADER_FAILED if leader_id in lookup.failed else None

    def park(self, follower: Follower, lookback: float) -> ParkOutcome:
        while True:
            outcome = self._park(follower, lookback)
            if outcome is not None:
                return outcome

    def _park(self, follower: Follower, lookback: float) -> ParkOutcome | None:
        values = {
            "b_scope": follower.scope,
            "b_follower": follower.follower_id,
            "b_leader": follower.leader_id,
            "b_task": follower.task_name,
            "b_occurred": follower.occurred_at,
            "b_ctype": follower.content_type,
            "b_cenc": follower.content_encoding,
            "b_payload": follower.payload,
            "b_host": follower.hostname,
            "b_lookback": lookback,
        }

        # The park/complete interleaving: this follower read "leader not done", then the
        # leader (another worker) committed its done record and looked for followers before
        # this row existed. Both sides write the leader's row in causal_done with INSERT ...
        # ON CONFLICT, which PostgreSQL and SQLite serialise per key and which reads the
        # latest committed version, not a snapshot. If the mark comes first, the leader's
        # record returns waited_at and the leader claims (a later statement, whose snapshot
        # has this row: in PostgreSQL mark and row commit together). If the record comes
        # first, the mark finds it done and this follower runs instead of parking.
        if self._sql.park_in_one is not None:
            ((marked, had_row, _),) = self._fetch(self._sql.park_in_one, values)
            if marked or had_row:
                return ParkOutcome.PARKED
            return self._settled(follower.scope, follower.leader_id)

        # SQLite cannot put the mark and the row in one statement; the row is committed
        # after the mark, so a leader that saw the mark may claim before the row exists.
        # The take-back closes that: a second statement, after the row, that sees the done
        # record (committed before that claim) and takes the row back itself.
        # ``claimed_at IS NULL`` makes the take-back and a claim exclusive.
        def run_in_three(conn: Any) -> bool:
            if conn.execute(self._sql.mark, values).first() is None:
                return conn.execute(HAS_ROW, values).first() is not None
            conn.execute(self._sql.park_insert, values)
            return conn.execute(TAKE_BACK, values).first() is None

        if self._run(run_in_three):
            return ParkOutcome.PARKED
        return self._settled(follower.scope, follower.leader_id)

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
        ((waited_at,),) = self._fetch(self._sql.record_done, params)
        return waited_at is not None

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
        if self._sql.record_and_claim is None:
            # SQLite: the record, then (if a follower marked the row) the claim, each
            # committed on its own; the claim's snapshot follows the record's commit.
            return record_then_claim(
                self,
                scope,
                task_id,
                limit,
                failed=failed,
                seen_ttl=seen_ttl,
                release_timeout=release_timeout,
            )
        params = {
            "b_scope": scope,
            "b_task_id": task_id,
            "b_limit": limit,
            "b_failed": failed,
            "b_ttl": seen_ttl,
            "b_timeout": release_timeout,
        }
        rows = self._fetch(self._sql.record_and_claim, params)
        waited_at, seen_waited_at = rows[0][0], rows[0][1]
        if waited_at is None:
            return DoneRecord(waited=False, claimed=[], complete=True)
        claimed = release_order(_claimed(*row[2:]) for row in rows if row[2] is not None)
        # Complete only if no park committed after the snapshot the claim read, and the
        # batch was not cut short by the limit.
        complete = waited_at == seen_waited_at and limit > 0 and len(claimed) < limit
        return DoneRecord(True, claimed, complete)

    def _claim(self, stmt: Any, params: dict[str, Any]) -> list[ClaimedFollower]:
        return release_order(_claimed(*row) for row in self._fetch(stmt, params))

    def claim_followers(self, scope: str, leader_id: str, limit: int) -> list[ClaimedFollower]:
        params = {"b_scope": scope, "b_leader": leader_id, "b_limit": limit}
        return self._claim(self._sql.claim_followers, params)

    def claim_lost(self, release_timeout: float, limit: int) -> list[ClaimedFollower]:
        params: dict[str, Any] = {"b_timeout": release_timeout, "b_limit": limit}
        claimed = [
            dataclasses.replace(c, stuck=True) for c in self._claim(self._sql.claim_stuck, params)
        ]
        if len(claimed) < limit:
            params = {"b_limit": limit - len(claimed)}
            claimed += self._claim(self._sql.claim_lost, params)
        return release_order(claimed)

    def _ring_firsts(self, limit: int, postpone: bool = False) -> list[tuple[str, str]]:
        """(scope, follower id) of the first row of each ring among due rows (see core.rings).

        With ``postpone``, the candidates found in no ring are postponed (POSTPONE).
        """
        starts = self._fetch(RING_CANDIDATES, {"b_limit": limit})
        if not starts:
            return []
        walked = self._run(
            lambda c: c.execute(LEADER_WALK, {"b_ids": [row[0] for row in starts]}).all()
        )
        links = {(r[0], r[1]): (r[0], r[2]) for r in walked}
        occurred = {(r[0], r[1]): r[3] for r in walked}
        found = rings(links)
        if postpone:
            in_rings = {key for ring in found for key in ring}
            free = [row[0] for row in starts if (row[1], row[2]) not in in_rings]
            if free:
                self._rowcount(POSTPONE, {"b_ids": free})
        return [min(ring, key=lambda key: (occurred[key], key[1])) for ring in found]

    def claim_cycles(self, limit: int) -> list[ClaimedFollower]:
        claimed: list[ClaimedFollower] = []
        claim = self._sql.restarting(CLAIM_DUE_ONE)
        for scope, first in self._ring_firsts(limit, postpone=True):
            params = {"b_scope": scope, "b_follower": first}
            claimed += [_claimed(*row) for row in self._fetch(claim, params)]
        return release_order(claimed)

    def claim_orphans(self, limit: int) -> list[ClaimedFollower]:
        while self._rowcount(CLEAR_RELEASES, {"b_limit": limit}) == limit:
            pass  # each round clears a batch of finished releases
        claimed: list[ClaimedFollower] = []
        for scope, leader in self._fetch(ORPHANED_LEADERS, {"b_limit": limit}):
            if len(claimed) >= limit:
                break
            claimed += self.claim_followers(scope, leader, limit - len(claimed))
        return release_order(claimed)

    def make_due(self, scope: str, leader_id: str) -> int:
        params = {"b_scope": scope, "b_leader": leader_id}
        return self._rowcount(MAKE_DUE, params)

    def finish(self, row_ids: Sequence[int]) -> None:
        if not row_ids:
            return
        ids = {"b_ids": list(row_ids)}
        if self.is_postgresql:
            # One prebuilt statement whatever the batch size (an array parameter). The rows'
            # followers had their lookback restarted when the rows were claimed.
            self._fetch(FINISH_ANY, ids)
            return

        # SQLite: the restart first, then the delete. A crash in between leaves the rows
        # claimed (the sweep republishes them) and their followers waiting a little longer.
        def run(conn: Any) -> None:
            conn.execute(RESTART_IN, ids)
            conn.execute(FINISH_IN, ids)

        self._run(run)

    def bury(self, row_id: int, reason: str) -> None:
        columns = [c.name for c in dead_followers.c if c.name not in ("died_at", "reason")]
        source = select(
            *(followers.c[name] for name in columns),
            db_clock().label("died_at"),
            literal(reason[:2000]).label("reason"),
        ).where(followers.c.id == row_id)
        copy = (
            self._insert(dead_followers)
            .from_select([*columns, "died_at", "reason"], source)
            .on_conflict_do_nothing(index_elements=["id"])
        )
        remove = (
            delete(followers)
            .where(followers.c.id == row_id)
            .returning(followers.c.scope, followers.c.follower_id)
        )

        # Copy, then delete: a crash in between leaves the row claimed, the sweep claims
        # it again, and the copy's ON CONFLICT makes the second burial a no-op.
        def run(conn: Any) -> None:
            conn.execute(copy)
            for scope, follower_id in conn.execute(remove).all():
                conn.execute(UNPOSTPONE, {"b_scope": scope, "b_leader": follower_id})

        self._run(run)

    def unclaim(self, row_ids: Sequence[int]) -> None:
        if row_ids:
            stmt = (
                update(followers).where(followers.c.id.in_(list(row_ids))).values(claimed_at=None)
            )
            self._run(lambda c: c.execute(stmt))

    def forget(self, scope: str, follower_id: str) -> Follower | None:
        stmt = (
            delete(followers)
            .where(followers.c.scope == scope, followers.c.follower_id == follower_id)
            .returning(*(followers.c[f.name] for f in dataclasses.fields(Follower)))
        )

        def run(conn: Any) -> Follower | None:
            row = conn.execute(stmt).first()
            if row is None:
                return None
            conn.execute(UNPOSTPONE, {"b_scope": scope, "b_leader": follower_id})
            return Follower(**{**row._asdict(), "payload": bytes(row.payload)})

        return self._run(run)

    def count_followers(self, scope: str, leader_id: str) -> int:
        stmt = select(func.count()).where(
            followers.c.scope == scope,
            followers.c.leader_id == leader_id,
            followers.c.claimed_at.is_(None),
        )
        return int(self._run(lambda c: c.execute(stmt).scalar_one()))

    def expire_done(self, seen_ttl: float, limit: int) -> int:
        expired = 0
        for stmt in (EXPIRE_OUTCOMES, EXPIRE_MARKS):
            params = {"b_ttl": seen_ttl, "b_limit": limit - expired}
            expired += self._rowcount(stmt, params)
            if expired >= limit:
                break
        return expired

    def _rowcount(self, stmt: Any, params: dict[str, Any]) -> int:
        return int(self._run(lambda c: c.execute(stmt, params).rowcount))

    def stats(self, release_timeout: float = 60.0) -> list[ScopeStats]:
        waiting = followers.c.claimed_at.is_(None)
        stuck = followers.c.claimed_at < db_clock() - release_timeout
        overdue = and_(waiting, followers.c.deadline < db_clock(), ~LEADER_PARKED)
        stmt = (
            select(
                followers.c.scope,
                func.sum(case((waiting, 1), else_=0)),
                func.sum(case((waiting, 0), else_=1)),
                func.min(case((waiting, followers.c.parked_at), else_=None)),
                func.sum(case((overdue, 1), else_=0)),
                func.sum(case((stuck, 1), else_=0)),
            )
            .group_by(followers.c.scope)
            .order_by(followers.c.scope)
        )
        dead_stmt = select(dead_followers.c.scope, func.count()).group_by(dead_followers.c.scope)

        def run(conn: Any) -> tuple[list[Any], dict[str, int]]:
            return conn.execute(stmt).all(), dict(conn.execute(dead_stmt).all())

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
        self, scope: str | None, leader_id: str | None, limit: int
    ) -> list[FollowerInfo]:
        stmt = select(*(followers.c[f.name] for f in dataclasses.fields(FollowerInfo)))
        if scope is not None:
            stmt = stmt.where(followers.c.scope == scope)
        if leader_id is not None:
            stmt = stmt.where(followers.c.leader_id == leader_id)
        stmt = stmt.order_by(followers.c.parked_at, followers.c.id).limit(limit)
        rows = self._run(lambda c: c.execute(stmt).all())
        return [FollowerInfo(*row) for row in rows]

    def claim_one(self, scope: str, follower_id: str) -> ClaimedFollower | None:
        stmt = (
            update(followers)
            .where(followers.c.scope == scope, followers.c.follower_id == follower_id)
            .values(claimed_at=db_clock())
            .returning(*FOLLOWER_COLUMNS)
        )
        row = self._run(lambda c: c.execute(self._sql.restarting(stmt)).first())
        return None if row is None else _claimed(*row)

    def scopes_of(self, follower_id: str) -> list[str]:
        stmt = (
            select(followers.c.scope)
            .where(followers.c.follower_id == follower_id)
            .order_by(followers.c.scope)
        )
        return list(self._run(lambda c: c.execute(stmt).scalars().all()))

    def clock(self) -> float:
        """The database's clock, epoch seconds."""
        return float(self._run(lambda c: c.execute(select(db_clock())).scalar_one()))


def _schema_objects(conn: Any) -> set[str]:
    inspector = inspect(conn)
    found: set[str] = set()
    for table in metadata.tables.values():
        if inspector.has_table(table.name):
            found.add(f"table {table.name}")
            found.update(f"index {ix['name']}" for ix in inspector.get_indexes(table.name))
    return found
