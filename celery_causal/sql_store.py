"""The SQL store: PostgreSQL (psycopg 3) in production, SQLite as the embedded default.

Every operation is one or two single-statement autocommit transactions, so no lock is held
across a round trip. The comments on :meth:`SQLStore.park` and in ``store.py`` explain how
those statements close the park/release race.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    Engine,
    and_,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .core import release_order
from .errors import StoreUnavailable
from .settings import mask_url
from .sql_schema import db_clock, done, followers, metadata
from .store import (
    ClaimedFollower,
    Follower,
    FollowerInfo,
    Lookup,
    ParkOutcome,
    ScopeStats,
)

T = TypeVar("T")

_FOLLOWER_COLUMNS = (
    followers.c.id,
    followers.c.scope,
    followers.c.follower_id,
    followers.c.leader_id,
    followers.c.task_name,
    followers.c.occurred_at,
    followers.c.parked_at,
    followers.c.content_type,
    followers.c.content_encoding,
    followers.c.payload,
    followers.c.hostname,
)

# Any constant: serialises concurrent CREATE TABLE from many processes starting at once.
_SCHEMA_LOCK_KEY = 0x636175736C


def _claimed(row: Any) -> ClaimedFollower:
    return ClaimedFollower(
        scope=row.scope,
        follower_id=row.follower_id,
        leader_id=row.leader_id,
        task_name=row.task_name,
        occurred_at=row.occurred_at,
        payload=bytes(row.payload),
        content_type=row.content_type,
        content_encoding=row.content_encoding,
        hostname=row.hostname,
        row_id=row.id,
        parked_at=row.parked_at,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets prefork children read while one writes; busy_timeout makes writers queue
    # instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SQLStore:
    """:class:`~celery_causal.store.CausalStore` on SQLAlchemy Core."""

    def __init__(self, url: str, *, create_schema: bool = True) -> None:
        self.url = url
        self._auto_schema = create_schema
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._insert: Callable[..., Any] = (
            sqlite.insert if url.startswith("sqlite") else postgresql.insert
        )
        self.is_postgresql = url.startswith("postgresql")

    def __repr__(self) -> str:
        return f"SQLStore({mask_url(self.url)!r})"

    # -- connections -------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        # Engines never cross a fork: Celery's prefork children inherit the parent's
        # memory, and a pooled connection used by two processes corrupts both sessions.
        # A child sees a different pid and builds its own engine; the inherited one is
        # dropped without closing the parent's sockets.
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            with self._lock:
                if self._engine is None or self._pid != pid:
                    if self._engine is not None:
                        self._engine.dispose(close=False)
                    self._engine = self._make_engine()
                    self._pid = pid
                    if self._auto_schema:
                        self.create_schema()
        return self._engine

    def _make_engine(self) -> Engine:
        if self.url.startswith("sqlite"):
            engine = create_engine(
                self.url, isolation_level="AUTOCOMMIT", connect_args={"timeout": 30}
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=5, max_overflow=10)

    def _run(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation(connection)``; one immediate retry after a dropped connection.

        Every operation is safe to repeat (inserts are ON CONFLICT, claims move rows out
        of ``waiting`` once), so a retry after a connection was cut mid-statement cannot
        duplicate or lose anything. Other database errors become :class:`StoreUnavailable`.
        """
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    return operation(conn)
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt == 1:
                    continue
                reason = " ".join(str(exc.orig).split())
                raise StoreUnavailable(
                    f"causal store {mask_url(self.url)} failed: {type(exc.orig).__name__}: {reason}"
                ) from exc
            except SQLAlchemyError as exc:
                raise StoreUnavailable(
                    f"causal store {mask_url(self.url)} failed: {exc!r}"
                ) from exc
        raise AssertionError("unreachable")

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

        if self._engine is None:
            self._auto_schema = False  # build the engine without recursing into here
            try:
                _ = self.engine
            finally:
                self._auto_schema = True
        return self._run(create)

    def close(self) -> None:
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    # -- operations --------------------------------------------------------------------

    def lookup(self, scope: str, task_ids: Sequence[str], seen_ttl: float) -> Lookup:
        # One row whatever the answer: the clock plus one EXISTS per asked id.
        columns: list[Any] = [db_clock().label("now")]
        for i, task_id in enumerate(task_ids):
            columns.append(
                exists().where(self._done_within(scope, task_id, seen_ttl)).label(f"d{i}")
            )
        row = self._run(lambda c: c.execute(select(*columns)).one())
        found = frozenset(t for i, t in enumerate(task_ids) if row[i + 1])
        return Lookup(done=found, now=float(row[0]))

    @staticmethod
    def _done_within(scope: str, task_id: str, seen_ttl: float) -> Any:
        return and_(
            done.c.scope == scope,
            done.c.task_id == task_id,
            done.c.done_at > db_clock() - seen_ttl,
        )

    def park(self, follower: Follower, seen_ttl: float) -> ParkOutcome:
        insert = (
            self._insert(followers)
            .values(
                scope=follower.scope,
                follower_id=follower.follower_id,
                leader_id=follower.leader_id,
                task_name=follower.task_name,
                occurred_at=follower.occurred_at,
                parked_at=db_clock(),
                content_type=follower.content_type,
                content_encoding=follower.content_encoding,
                payload=follower.payload,
                hostname=follower.hostname,
            )
            .on_conflict_do_nothing(index_elements=["scope", "follower_id"])
        )
        # The park/complete interleaving: this follower read "leader not done", then the
        # leader (another worker) committed its done record and claimed its followers
        # before this row existed. The insert above is committed first (autocommit); this
        # second statement takes a fresh snapshot, so it sees any done record committed
        # before the insert, and then takes the row back itself. If instead the leader
        # commits after this check, its claim (a later snapshot) sees the committed row.
        # ``claimed_at IS NULL`` makes the take-back and the leader's claim exclusive: a
        # claim in flight holds the row lock; once it commits, this DELETE re-reads the
        # row, finds it claimed and deletes nothing.
        take_back = (
            delete(followers)
            .where(
                followers.c.scope == follower.scope,
                followers.c.follower_id == follower.follower_id,
                followers.c.claimed_at.is_(None),
                exists().where(self._done_within(follower.scope, follower.leader_id, seen_ttl)),
            )
            .returning(followers.c.id)
        )

        def run(conn: Any) -> ParkOutcome:
            conn.execute(insert)
            taken = conn.execute(take_back).first()
            return ParkOutcome.LEADER_DONE if taken is not None else ParkOutcome.PARKED

        return self._run(run)

    def record_done(self, scope: str, task_id: str) -> None:
        stmt = self._insert(done).values(scope=scope, task_id=task_id, done_at=db_clock())
        # A task run again after its record expired refreshes it.
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope", "task_id"], set_={"done_at": stmt.excluded.done_at}
        )
        self._run(lambda c: c.execute(stmt))

    def _claim(self, where: Any, order_by: Any, limit: int) -> list[ClaimedFollower]:
        # SKIP LOCKED: concurrent claimers (two sweeps, a sweep and a leader) take disjoint
        # rows instead of waiting on each other; the claim is one UPDATE, so a row is never
        # selected by one statement and taken by another.
        ids = (
            select(followers.c.id)
            .where(where)
            .order_by(*order_by)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(followers)
            .where(followers.c.id.in_(ids.scalar_subquery()))
            .values(claimed_at=db_clock())
            .returning(*_FOLLOWER_COLUMNS)
        )
        rows = self._run(lambda c: c.execute(stmt).all())
        return release_order(_claimed(r) for r in rows)

    def claim_followers(self, scope: str, leader_id: str, limit: int) -> list[ClaimedFollower]:
        where = and_(
            followers.c.scope == scope,
            followers.c.leader_id == leader_id,
            followers.c.claimed_at.is_(None),
        )
        return self._claim(where, (followers.c.occurred_at, followers.c.follower_id), limit)

    def claim_lost(
        self, lookback: float, release_timeout: float, limit: int
    ) -> list[ClaimedFollower]:
        stuck = and_(
            followers.c.claimed_at.is_not(None),
            followers.c.claimed_at < db_clock() - release_timeout,
        )
        claimed = self._claim(stuck, (followers.c.claimed_at,), limit)
        if len(claimed) < limit:
            lost = and_(
                followers.c.claimed_at.is_(None),
                followers.c.parked_at < db_clock() - lookback,
            )
            claimed += self._claim(lost, (followers.c.parked_at,), limit - len(claimed))
        return release_order(claimed)

    def finish(self, row_ids: Sequence[int]) -> None:
        if row_ids:
            stmt = delete(followers).where(followers.c.id.in_(list(row_ids)))
            self._run(lambda c: c.execute(stmt))

    def unclaim(self, row_ids: Sequence[int]) -> None:
        if row_ids:
            stmt = (
                update(followers).where(followers.c.id.in_(list(row_ids))).values(claimed_at=None)
            )
            self._run(lambda c: c.execute(stmt))

    def forget(self, scope: str, follower_id: str) -> bool:
        stmt = (
            delete(followers)
            .where(followers.c.scope == scope, followers.c.follower_id == follower_id)
            .returning(followers.c.id)
        )
        return self._run(lambda c: c.execute(stmt).first()) is not None

    def count_followers(self, scope: str, leader_id: str) -> int:
        stmt = select(func.count()).where(
            followers.c.scope == scope,
            followers.c.leader_id == leader_id,
            followers.c.claimed_at.is_(None),
        )
        return int(self._run(lambda c: c.execute(stmt).scalar_one()))

    def expire_done(self, seen_ttl: float, limit: int) -> int:
        old = (
            select(done.c.scope, done.c.task_id)
            .where(done.c.done_at <= db_clock() - seen_ttl)
            .order_by(done.c.done_at)
            .limit(limit)
        )
        stmt = delete(done).where(tuple_(done.c.scope, done.c.task_id).in_(old))
        return int(self._run(lambda c: c.execute(stmt).rowcount))

    def stats(self, lookback: float, release_timeout: float = 60.0) -> list[ScopeStats]:
        waiting = followers.c.claimed_at.is_(None)
        stuck = followers.c.claimed_at < db_clock() - release_timeout
        stmt = (
            select(
                followers.c.scope,
                func.sum(case((waiting, 1), else_=0)),
                func.sum(case((waiting, 0), else_=1)),
                func.min(case((waiting, followers.c.parked_at), else_=None)),
                func.sum(
                    case((and_(waiting, followers.c.parked_at < db_clock() - lookback), 1), else_=0)
                ),
                func.sum(case((stuck, 1), else_=0)),
            )
            .group_by(followers.c.scope)
            .order_by(followers.c.scope)
        )
        rows = self._run(lambda c: c.execute(stmt).all())
        return [
            ScopeStats(
                scope=r[0],
                waiting=int(r[1] or 0),
                releasing=int(r[2] or 0),
                oldest_parked_at=None if r[3] is None else float(r[3]),
                overdue=int(r[4] or 0),
                stuck=int(r[5] or 0),
            )
            for r in rows
        ]

    def list_followers(
        self, scope: str | None, leader_id: str | None, limit: int
    ) -> list[FollowerInfo]:
        stmt = select(
            followers.c.scope,
            followers.c.follower_id,
            followers.c.leader_id,
            followers.c.task_name,
            followers.c.occurred_at,
            followers.c.parked_at,
            followers.c.claimed_at,
        )
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
            .returning(*_FOLLOWER_COLUMNS)
        )
        row = self._run(lambda c: c.execute(stmt).first())
        return None if row is None else _claimed(row)

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
