"""The SQL store: PostgreSQL (psycopg 3) in production, SQLite as the embedded default.

Every operation is one or two single-statement autocommit transactions, so no lock is held
across a round trip. The comments on :meth:`SQLStore.park` and in ``store.py`` explain how
those statements close the park/release race.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Double,
    Engine,
    LargeBinary,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    inspect,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .core import release_order
from .errors import StoreError
from .settings import mask_url
from .sql_engine import Compiled, Database
from .sql_schema import db_clock, dead_followers, done, followers, metadata
from .store import (
    ClaimedFollower,
    DoneRecord,
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

#: The smallest step by which a mark moves waited_at forward (see SQLStore._mark).
_TICK = 1e-6

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
    # Positional, in the order of _FOLLOWER_COLUMNS: rows come from the bare cursor.
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


def _done_within(task_param: str) -> Any:
    return and_(
        done.c.scope == bindparam("b_scope"),
        done.c.task_id == bindparam(task_param),
        done.c.done_at > db_clock() - bindparam("b_ttl", type_=Double),
    )


def _lookup_statement(count: int) -> Any:
    # One row whatever the answer: the clock plus one EXISTS per asked id.
    return select(
        db_clock().label("now"),
        *(exists().where(_done_within(f"t{i}")).label(f"d{i}") for i in range(count)),
    )


_LOOKUPS = {count: _lookup_statement(count) for count in (1, 2)}

_TAKE_BACK = (
    delete(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
        followers.c.claimed_at.is_(None),
        exists().where(_done_within("b_leader")),
    )
    .returning(followers.c.id)
)


#: The row of a follower's leader, when the leader is itself a parked follower.
_leader_row = followers.alias("leader_row")
# OFFSET 0 keeps PostgreSQL from turning the test into an anti-join over the whole table
# (its row estimate for it is poor): it stays one unique-index probe per candidate row.
_LEADER_PARKED = exists(
    select(literal(1))
    .where(
        _leader_row.c.scope == followers.c.scope,
        _leader_row.c.follower_id == followers.c.leader_id,
    )
    .offset(0)
)


def _restart_lookback(ids: Any) -> Any:
    """Followers of released rows start their lookback again: their leader has come.

    Without it, a follower whose leader was parked (a chain whose first task never came)
    could be swept as lost while that leader, just released, is still on its way.
    """
    return update(followers).where(followers.c.id.in_(ids)).values(parked_at=db_clock())


def _waiting_behind(released: Any) -> Any:
    """Ids of the waiting followers of ``released`` rows (their scope and follower id)."""
    return select(_leader_row.c.id).where(
        _leader_row.c.scope == released.c.scope,
        _leader_row.c.leader_id == released.c.follower_id,
        _leader_row.c.claimed_at.is_(None),
    )


# PostgreSQL: one statement deletes the released rows and restarts their followers'
# lookback, so no sweep ever sees a follower without its leader's row and without the
# restarted clock. It is one index range scan per released row, whatever the planner
# guesses about how many followers a released row has.
_released = (
    delete(followers)
    .where(followers.c.id == func.any(bindparam("b_ids", type_=postgresql.ARRAY(BigInteger))))
    .returning(followers.c.scope, followers.c.follower_id)
    .cte("released")
)
# OFFSET 0 keeps the planner from flattening the LATERAL into a hash join over the table.
_behind = _waiting_behind(_released).offset(0).lateral("behind")
_FINISH_ANY = _restart_lookback(
    select(_behind.c.id).select_from(_released.join(_behind, literal(True)))
)
_released_rows = (
    select(followers.c.scope, followers.c.follower_id)
    .where(followers.c.id.in_(bindparam("b_ids", expanding=True)))
    .subquery("released")
)
_RESTART_IN = _restart_lookback(
    select(_leader_row.c.id)
    .select_from(
        _leader_row.join(
            _released_rows,
            and_(
                _leader_row.c.scope == _released_rows.c.scope,
                _leader_row.c.leader_id == _released_rows.c.follower_id,
            ),
        )
    )
    .where(_leader_row.c.claimed_at.is_(None))
)
_FINISH_IN = delete(followers).where(followers.c.id.in_(bindparam("b_ids", expanding=True)))

_HAS_ROW = select(literal(1)).where(
    followers.c.scope == bindparam("b_scope"),
    followers.c.follower_id == bindparam("b_follower"),
)


def _claim_statement(where: Any, order_by: Any) -> Any:
    # SKIP LOCKED: concurrent claimers (two sweeps, a sweep and a leader) take disjoint
    # rows instead of waiting on each other; the claim is one UPDATE, so a row is never
    # selected by one statement and taken by another.
    ids = (
        select(followers.c.id)
        .where(where)
        .order_by(*order_by)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True)
    )
    return (
        update(followers)
        .where(followers.c.id.in_(ids.scalar_subquery()))
        .values(claimed_at=db_clock())
        .returning(*_FOLLOWER_COLUMNS)
    )


_CLAIM_FOLLOWERS = _claim_statement(
    and_(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        followers.c.claimed_at.is_(None),
    ),
    (followers.c.occurred_at, followers.c.follower_id),
)
# Rows whose releaser died mid-release (claimed long ago) ...
_CLAIM_STUCK = _claim_statement(
    and_(
        followers.c.claimed_at.is_not(None),
        followers.c.claimed_at < db_clock() - bindparam("b_timeout", type_=Double),
    ),
    (followers.c.claimed_at,),
)
# ... and lost followers: waiting longer than the lookback, oldest parked first (each
# batch is then sorted by occurred time). A follower whose leader is itself parked is not
# lost: its leader came and waits in turn, and releases it once it has run.
_CLAIM_LOST = _claim_statement(
    and_(
        followers.c.claimed_at.is_(None),
        followers.c.parked_at < db_clock() - bindparam("b_lookback", type_=Double),
        ~_LEADER_PARKED,
    ),
    (followers.c.parked_at,),
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
        self._park_insert = (
            self._insert(followers)
            .values(
                scope=bindparam("b_scope"),
                follower_id=bindparam("b_follower"),
                leader_id=bindparam("b_leader"),
                task_name=bindparam("b_task"),
                occurred_at=bindparam("b_occurred"),
                parked_at=db_clock(),
                content_type=bindparam("b_ctype"),
                content_encoding=bindparam("b_cenc"),
                payload=bindparam("b_payload"),
                hostname=bindparam("b_host"),
            )
            # Parking is idempotent: a redelivered follower leaves the one row there is.
            .on_conflict_do_nothing(index_elements=["scope", "follower_id"])
        )
        # A follower marks its leader's row as waited for, unless the leader is done (the
        # WHERE leaves a done row untouched and returns nothing). An expired done record
        # counts as not done, as in lookup(), and becomes a mark.
        mark = self._insert(done).values(
            scope=bindparam("b_scope"),
            task_id=bindparam("b_leader"),
            done_at=None,
            waited_at=db_clock(),
        )
        waited_at: Any = mark.excluded.waited_at
        if self.is_postgresql:
            # Every mark moves waited_at forward, even two taken in the same microsecond:
            # the done record compares the value it read in its snapshot with the latest
            # one to learn whether a park committed while it waited (_record_and_claim).
            waited_at = func.greatest(waited_at, done.c.waited_at + _TICK)
        self._mark = mark.on_conflict_do_update(
            index_elements=["scope", "task_id"],
            set_={"waited_at": waited_at, "done_at": None},
            where=or_(
                done.c.done_at.is_(None),
                done.c.done_at <= db_clock() - bindparam("b_ttl", type_=Double),
            ),
        ).returning(literal(1))
        self._park_in_one = self._park_statement() if self.is_postgresql else None
        row: Any = select(bindparam("b_scope"), bindparam("b_task_id"), db_clock(), null())
        if self.is_postgresql:
            # The done record alone is committed without waiting for the WAL flush
            # (synchronous_commit off for this statement's transaction). It is visible at
            # once, which is all the park/release protocol needs; only a crash of the
            # PostgreSQL server can lose the last fraction of a second of them, and then a
            # follower waits for the sweep or a redelivered task runs again. Parked rows
            # are always flushed: their messages are acked once the row is committed.
            local = func.set_config("synchronous_commit", "off", True).label("setting")
            row = row.select_from(select(local).subquery("local_setting"))
        record = self._insert(done).from_select(["scope", "task_id", "done_at", "waited_at"], row)
        # A task run again after its record expired refreshes it. RETURNING waited_at tells
        # whether any follower marked the row before this record: if none did, there is
        # nothing to claim (a follower that parks later finds the record and runs).
        self._record_done = record.on_conflict_do_update(
            index_elements=["scope", "task_id"], set_={"done_at": record.excluded.done_at}
        ).returning(done.c.waited_at)
        self._record_and_claim = self._record_and_claim_statement() if self.is_postgresql else None

    def _park_statement(self) -> Any:
        """PostgreSQL: mark the leader's row and insert the follower in one statement."""
        mark = self._mark.cte("mark")
        row = select(
            bindparam("b_scope"),
            bindparam("b_follower"),
            bindparam("b_leader"),
            bindparam("b_task"),
            bindparam("b_occurred", type_=Double),
            db_clock(),
            bindparam("b_ctype"),
            bindparam("b_cenc"),
            bindparam("b_payload", type_=LargeBinary),
            bindparam("b_host"),
        ).where(exists(select(mark)))
        parked = (
            self._insert(followers)
            .from_select(
                [
                    "scope",
                    "follower_id",
                    "leader_id",
                    "task_name",
                    "occurred_at",
                    "parked_at",
                    "content_type",
                    "content_encoding",
                    "payload",
                    "hostname",
                ],
                row,
            )
            .on_conflict_do_nothing(index_elements=["scope", "follower_id"])
            .returning(followers.c.id)
            .cte("parked")
        )
        # The statement's snapshot predates its own insert: "had_row" is a row parked by an
        # earlier delivery of the same follower.
        had_row = exists().where(
            followers.c.scope == bindparam("b_scope"),
            followers.c.follower_id == bindparam("b_follower"),
        )
        return select(
            exists(select(mark)).label("marked"),
            had_row.label("had_row"),
            exists(select(parked)).label("inserted"),
        )

    def _record_and_claim_statement(self) -> Any:
        """PostgreSQL: the done record and the claim of the first followers in one statement.

        The claim reads the statement's snapshot, taken before the record waited for the
        leader's row lock: a follower whose park committed during that wait marked the row
        (so ``waited_at`` returned by the record is newer than the one in the snapshot) but
        its row is not in the snapshot. The caller then claims again in a statement of its
        own, as it does whenever a batch came back full.
        """
        record = self._record_done.cte("record")
        snapshot = select(done.c.waited_at).where(
            done.c.scope == bindparam("b_scope"), done.c.task_id == bindparam("b_task_id")
        )
        ids = (
            select(followers.c.id)
            .where(
                followers.c.scope == bindparam("b_scope"),
                followers.c.leader_id == bindparam("b_task_id"),
                followers.c.claimed_at.is_(None),
                # Nothing to look for when no follower ever marked the row (most tasks).
                exists().where(record.c.waited_at.is_not(None)),
            )
            .order_by(followers.c.occurred_at, followers.c.follower_id)
            .limit(bindparam("b_limit"))
            .with_for_update(skip_locked=True, of=followers)
        )
        claimed = (
            update(followers)
            .where(followers.c.id.in_(ids.scalar_subquery()))
            .values(claimed_at=db_clock())
            .returning(*_FOLLOWER_COLUMNS)
            .cte("claimed")
        )
        return select(
            record.c.waited_at,
            snapshot.scalar_subquery().label("seen_waited_at"),
            *claimed.c,
        ).select_from(record.outerjoin(claimed, literal(True)))

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
                upgraded = _upgrade_done_table(conn, self.is_postgresql)
                metadata.create_all(conn, checkfirst=True)
                return upgraded + sorted(_schema_objects(conn) - before)
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

    def lookup(self, scope: str, task_ids: Sequence[str], seen_ttl: float) -> Lookup:
        stmt = _LOOKUPS.get(len(task_ids))
        if stmt is None:
            stmt = _lookup_statement(len(task_ids))
        params: dict[str, Any] = {"b_scope": scope, "b_ttl": seen_ttl}
        params.update((f"t{i}", task_id) for i, task_id in enumerate(task_ids))
        (row,) = self._fetch(stmt, params)
        found = frozenset(t for i, t in enumerate(task_ids) if row[i + 1])
        return Lookup(done=found, now=float(row[0]))

    def park(self, follower: Follower, seen_ttl: float) -> ParkOutcome:
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
            "b_ttl": seen_ttl,
        }

        # The park/complete interleaving: this follower read "leader not done", then the
        # leader (another worker) committed its done record and looked for followers before
        # this row existed. Both sides write the leader's row in causal_done with INSERT ...
        # ON CONFLICT, which PostgreSQL and SQLite serialise per key and which reads the
        # latest committed version, not a snapshot. If the mark comes first, the leader's
        # record returns waited_at and the leader claims (a later statement, whose snapshot
        # has this row: in PostgreSQL mark and row commit together). If the record comes
        # first, the mark finds it done and this follower runs instead of parking.
        if self._park_in_one is not None:
            ((marked, had_row, _),) = self._fetch(self._park_in_one, values)
            return ParkOutcome.PARKED if marked or had_row else ParkOutcome.LEADER_DONE

        # SQLite cannot put the mark and the row in one statement; the row is committed
        # after the mark, so a leader that saw the mark may claim before the row exists.
        # The take-back closes that: a second statement, after the row, that sees the done
        # record (committed before that claim) and takes the row back itself.
        # ``claimed_at IS NULL`` makes the take-back and a claim exclusive.
        def run_in_three(conn: Any) -> ParkOutcome:
            if conn.execute(self._mark, values).first() is None:
                had_row = conn.execute(_HAS_ROW, values).first() is not None
                return ParkOutcome.PARKED if had_row else ParkOutcome.LEADER_DONE
            conn.execute(self._park_insert, values)
            taken = conn.execute(_TAKE_BACK, values).first()
            return ParkOutcome.LEADER_DONE if taken is not None else ParkOutcome.PARKED

        return self._run(run_in_three)

    def record_done(self, scope: str, task_id: str) -> bool:
        params = {"b_scope": scope, "b_task_id": task_id}
        ((waited_at,),) = self._fetch(self._record_done, params)
        return waited_at is not None

    def record_done_and_claim(self, scope: str, task_id: str, limit: int) -> DoneRecord:
        if self._record_and_claim is None:
            # SQLite: the record, then (if a follower marked the row) the claim, each
            # committed on its own; the claim's snapshot follows the record's commit.
            if not self.record_done(scope, task_id):
                return DoneRecord(waited=False, claimed=[], complete=True)
            claimed = self.claim_followers(scope, task_id, limit) if limit else []
            return DoneRecord(True, claimed, complete=limit > 0 and len(claimed) < limit)
        params = {"b_scope": scope, "b_task_id": task_id, "b_limit": limit}
        rows = self._fetch(self._record_and_claim, params)
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
        return self._claim(_CLAIM_FOLLOWERS, params)

    def claim_lost(
        self, lookback: float, release_timeout: float, limit: int
    ) -> list[ClaimedFollower]:
        claimed = self._claim(_CLAIM_STUCK, {"b_timeout": release_timeout, "b_limit": limit})
        if len(claimed) < limit:
            params = {"b_lookback": lookback, "b_limit": limit - len(claimed)}
            claimed += self._claim(_CLAIM_LOST, params)
        return release_order(claimed)

    def finish(self, row_ids: Sequence[int]) -> None:
        if not row_ids:
            return
        ids = {"b_ids": list(row_ids)}
        if self.is_postgresql:
            # One prebuilt statement whatever the batch size (an array parameter).
            self._fetch(_FINISH_ANY, ids)
            return

        # SQLite: the restart first, then the delete. A crash in between leaves the rows
        # claimed (the sweep republishes them) and their followers waiting a little longer.
        def run(conn: Any) -> None:
            conn.execute(_RESTART_IN, ids)
            conn.execute(_FINISH_IN, ids)

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
        remove = delete(followers).where(followers.c.id == row_id)

        # Copy, then delete: a crash in between leaves the row claimed, the sweep claims
        # it again, and the copy's ON CONFLICT makes the second burial a no-op.
        def run(conn: Any) -> None:
            conn.execute(copy)
            conn.execute(remove)

        self._run(run)

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
        # Done records older than the TTL, then marks nobody refreshed for as long: every
        # follower that made such a mark has waited past the lookback, so it is the sweep's.
        expired = 0
        for column, where in (
            (done.c.done_at, done.c.done_at <= db_clock() - seen_ttl),
            (
                done.c.waited_at,
                and_(done.c.done_at.is_(None), done.c.waited_at <= db_clock() - seen_ttl),
            ),
        ):
            old = (
                select(done.c.scope, done.c.task_id)
                .where(where)
                .order_by(column)
                .limit(limit - expired)
            )
            expired += self._rowcount(
                delete(done).where(tuple_(done.c.scope, done.c.task_id).in_(old))
            )
            if expired >= limit:
                break
        return expired

    def _rowcount(self, stmt: Any) -> int:
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
                    case(
                        (
                            and_(
                                waiting,
                                followers.c.parked_at < db_clock() - lookback,
                                ~_LEADER_PARKED,
                            ),
                            1,
                        ),
                        else_=0,
                    )
                ),
                func.sum(case((stuck, 1), else_=0)),
            )
            .group_by(followers.c.scope)
            .order_by(followers.c.scope)
        )
        dead_stmt = select(dead_followers.c.scope, func.count()).group_by(dead_followers.c.scope)

        def run(conn: Any) -> tuple[list[Any], dict[str, int]]:
            return conn.execute(stmt).all(), dict(conn.execute(dead_stmt).all())

        rows, dead = self._run(run)
        for scope in sorted(set(dead) - {r[0] for r in rows}):
            rows.append((scope, 0, 0, None, 0, 0))
        rows.sort(key=lambda r: r[0])
        return [
            ScopeStats(
                scope=r[0],
                waiting=int(r[1] or 0),
                releasing=int(r[2] or 0),
                oldest_parked_at=None if r[3] is None else float(r[3]),
                overdue=int(r[4] or 0),
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
            .returning(*_FOLLOWER_COLUMNS)
        )
        row = self._run(lambda c: c.execute(stmt).first())
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


def _upgrade_done_table(conn: Any, is_postgresql: bool) -> list[str]:
    """Bring a causal_done table of the first layout (no ``waited_at``) up to date."""
    inspector = inspect(conn)
    if not inspector.has_table(done.name):
        return []
    if "waited_at" in {c["name"] for c in inspector.get_columns(done.name)}:
        return []
    if is_postgresql:
        conn.execute(
            text("ALTER TABLE causal_done ADD COLUMN IF NOT EXISTS waited_at DOUBLE PRECISION")
        )
        conn.execute(text("ALTER TABLE causal_done ALTER COLUMN done_at DROP NOT NULL"))
        return ["upgraded table causal_done (column waited_at added, done_at nullable)"]
    # SQLite cannot relax NOT NULL in place. The table only caches done records for
    # causal_seen_ttl; followers of a dropped record wait for the sweep, never lost.
    done.drop(conn)
    return ["recreated table causal_done (SQLite: done records of the earlier layout dropped)"]
