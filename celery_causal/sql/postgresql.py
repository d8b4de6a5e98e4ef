"""The store on PostgreSQL (psycopg 3): a park, a record-and-claim, each one statement.

How a follower and its leader never strand each other
-----------------------------------------------------
A follower that found its leader not done parks; the leader, once it succeeded, records
its outcome and claims the followers waiting for it. The interleaving to close: the
follower read "not done", then the leader committed its record and looked for followers
before the follower's row existed.

Both sides write the leader's row in ``causal_done`` with INSERT ... ON CONFLICT, which
PostgreSQL serialises per key and which (under READ COMMITTED, pinned by ``engine.py``)
reads the newest committed version of the row, not a snapshot.

- The **park** (:data:`PARK`) is one statement: the mark on the leader's row (unless an
  outcome is recorded there) and the follower's row, inserted only if the mark was made.
  Both commit together.
- The **record** (:data:`RECORD_AND_CLAIM`) writes the outcome and returns the row's
  ``waited_at``; the same statement claims the waiting followers it sees.

If the mark commits first, the record returns its ``waited_at``, and the follower's row,
committed with the mark, is there to claim. If the record commits first, the mark's WHERE
finds the outcome and does nothing, so no row is inserted and the follower runs (or, for
a failure, meets it).

One gap is left inside the record-and-claim statement: its claim reads the statement's
snapshot, taken before the record waited for the row lock of a park in flight. Such a
park commits a newer ``waited_at`` (every mark moves it strictly forward, see
:func:`~.statements.mark_statement`) whose row is not in that snapshot. The statement
returns both values; when they differ, or a batch came back full, the caller claims again
in a statement of its own, whose snapshot has the row (``runtime`` loops on ``complete``).

Claims use ``FOR UPDATE SKIP LOCKED`` and move a row out of waiting in one UPDATE, so two
claimers (a leader, a sweep) take disjoint rows and each row is released once.

Releases restart the lookback of the released rows' own followers **when the rows are
claimed** (:func:`restarting`), not when they are deleted after their publish. A released
follower can run on another worker before its releaser deletes its row, and that
follower's own claim skips rows another transaction holds locked: a restart made by the
delete would hold its followers' rows just then, and the claim would miss them. At claim
time the claimed rows are not yet published: nobody else has a reason to claim their
followers. Until the delete, the claimed row itself keeps its followers from being swept
(``LEADER_PARKED``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Double,
    LargeBinary,
    String,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql

from ..core import release_order
from ..store import DEFAULT_SEEN_TTL, ClaimedFollower, DoneRecord, ParkOutcome
from . import housekeeping as hk
from . import statements as sql
from .engine import UNPREPARED
from .keys import PG_RECORD_KEY, record_tail_statement, remember_send_statement
from .schema import db_clock, done, followers, scope_counts
from .store import SQLStore, by_scope, claimed_row

# Any constant: serialises concurrent CREATE TABLE from many processes starting at once.
_SCHEMA_LOCK_KEY = 0x636175736C

_MARK = sql.mark_statement(postgresql.insert, strictly_later=True)
_RECORD = sql.record_statement(postgresql.insert, relaxed_commit=True)


def _restart_behind(claimed: Any, *, scoped: bool) -> Any:
    """A CTE restarting the lookback of the waiting followers of ``claimed`` rows, all of
    scope ``b_scope`` if ``scoped``."""
    # OFFSET 0 keeps the planner from flattening the LATERAL into a hash join over the
    # table; with the leader index's order (waiting_behind) the index stays its cheapest
    # path, whatever statistics the table has.
    heads = sql.marked(claimed, scoped=scoped).subquery("heads")
    behind = sql.waiting_behind(heads, scoped=scoped).offset(0).lateral("behind")
    # The ids are found once per statement, whatever plan PostgreSQL keeps for the UPDATE.
    # A generic plan made while the table was small may read the scope's rows and test
    # each against the ids; inlined, the ids would then be searched for again for every
    # row read (marks, followers behind), which costs the scope's rows times the marks.
    ids = (
        select(behind.c.id)
        .select_from(heads.join(behind, literal(True)))
        .cte("to_restart")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    restart = sql.restart_lookback(select(ids.c.id), scoped=scoped)
    # Most claims (and every record that claims nothing) have nobody behind them: this
    # test, on its own, runs once, before the UPDATE reads anything. Without it such a
    # plan would read the scope's rows on every record.
    return restart.where(exists(select(literal(1)).select_from(ids))).cte("restarted")


def restarting(claim: Any, *, scoped: bool) -> Any:
    """``claim`` (an UPDATE ... RETURNING the follower columns), which also restarts the
    lookback of the claimed rows' waiting followers, in the same statement. ``scoped``:
    the claim takes rows of scope ``b_scope`` only."""
    claimed = claim.cte("claimed")
    return select(*claimed.c).add_cte(_restart_behind(claimed, scoped=scoped))


def _park_statement() -> Any:
    """Mark the leader's row and insert the follower, only if marked, in one statement."""
    mark = _MARK.cte("mark")
    row = select(
        bindparam("b_scope"),
        bindparam("b_follower"),
        bindparam("b_leader"),
        bindparam("b_task"),
        bindparam("b_occurred", type_=Double),
        db_clock(),
        bindparam("b_lookback", type_=Double),
        db_clock() + bindparam("b_lookback", type_=Double),
        bindparam("b_ctype"),
        bindparam("b_cenc"),
        bindparam("b_payload", type_=LargeBinary),
        bindparam("b_host"),
        bindparam("b_key", type_=String),
    ).where(exists(select(mark)))
    columns = ["scope", "follower_id", "leader_id", "task_name", "occurred_at", "parked_at"]
    columns += ["lookback", "deadline", "content_type", "content_encoding", "payload"]
    parked = (
        postgresql.insert(followers)
        .from_select([*columns, "hostname", "ordering_key"], row)
        .on_conflict_do_nothing(index_elements=["follower_id", "scope"])
        .returning(followers.c.id)
        .cte("parked")
    )
    # The statement's snapshot predates its own insert: "had_row" is a row parked by an
    # earlier delivery of the same follower.
    had_row = exists().where(
        *sql.in_scope(followers), followers.c.follower_id == bindparam("b_follower")
    )
    return select(
        exists(select(mark)).label("marked"),
        had_row.label("had_row"),
        exists(select(parked)).label("inserted"),
        exists()
        .where(
            *sql.in_scope(followers),
            followers.c.follower_id == bindparam("b_follower"),
            followers.c.claimed_at.is_not(None),
        )
        .label("had_claimed"),
    )


def _record_and_claim_statement() -> Any:
    """The outcome record, the row's ``waited_at`` as the snapshot saw it, and the claim of
    the first waiting followers (restarting their own followers' lookback)."""
    record = _RECORD.cte("record")
    snapshot = select(done.c.waited_at).where(
        *sql.in_scope(done), done.c.task_id == bindparam("b_task_id")
    )
    ids = sql.claimable(
        select(followers.c.id, *sql.LEADER_ORDER)
        .where(
            *sql.in_scope(followers),
            followers.c.leader_id == bindparam("b_task_id"),
            sql.WAITING,
            # Nothing to look for when no follower ever marked the row (most tasks).
            exists().where(record.c.waited_at.is_not(None)),
        )
        .order_by(*sql.LEADER_ORDER)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True, of=followers),
        "claimable",
    )
    claimed = (
        update(followers)
        .where(
            sql.in_claimable(ids, as_array=True),
            *sql.in_scope(followers),
            *sql.within_leader_claim(ids, bindparam("b_task_id")),
        )
        .values(claimed_at=db_clock())
        .returning(*sql.FOLLOWER_COLUMNS)
        .cte("claimed")
    )
    return (
        select(
            record.c.waited_at,
            snapshot.scalar_subquery().label("seen_waited_at"),
            *claimed.c,
        )
        .select_from(record.outerjoin(claimed, literal(True)))
        .add_cte(_restart_behind(claimed, scoped=True))
    )


def _tidy_counts_statement() -> Any:
    """Each scope's counts folded into one row (its lowest shard), and counts at zero gone.

    A scope's rows come and go through many connections, so its count is spread over up to
    ``counts.SHARDS`` rows, which need not be zero when the scope is empty (+3 on one
    shard, -3 on another); ``status`` would read them for as long as the store lives.

    The rows of every scope with more than one count, or a zero one, are locked first, in
    (scope, shard) order; then only those rows are changed: the lowest of each scope takes
    their sum, the others go, and so does a sum of zero. The sum is right under concurrent
    triggers: a locked row is taken as it is once locked (a row changed since the
    statement began is read again), and cannot change until the commit; a count a trigger
    adds afterwards is a row of its own, left for the next tidy-up. No deadlock: every
    statement that locks counts (the triggers, this one, a second sweep's) takes them in
    (scope, shard) order, and this one waits for nothing once its rows are locked (it
    inserts none).
    """
    counts = scope_counts.c
    untidy = (
        select(counts.scope)
        .group_by(counts.scope)
        .having(or_(func.count() > 1, func.bool_or(counts.parked == 0)))
    )
    locked = (
        select(counts.scope, counts.shard, counts.parked)
        .where(counts.scope.in_(untidy))
        .order_by(counts.scope, counts.shard)
        .with_for_update()
        .cte("locked")
    )
    totals = (
        select(
            locked.c.scope,
            func.min(locked.c.shard).label("keep"),
            func.sum(locked.c.parked).label("parked"),
        )
        .group_by(locked.c.scope)
        .cte("totals")
    )
    kept = exists().where(
        totals.c.scope == counts.scope, totals.c.keep == counts.shard, totals.c.parked != 0
    )
    gone = (
        delete(scope_counts)
        .where(tuple_(counts.scope, counts.shard).in_(select(locked.c.scope, locked.c.shard)))
        .where(~kept)
        .returning(counts.scope)
        .cte("gone")
    )
    return (
        update(scope_counts)
        .where(counts.scope == totals.c.scope, counts.shard == totals.c.keep)
        .where(totals.c.parked != 0)
        .values(parked=totals.c.parked)
        .add_cte(gone)
    )


PARK = _park_statement()
RECORD_AND_CLAIM = _record_and_claim_statement()
TIDY_COUNTS = _tidy_counts_statement()
#: Released rows of one scope go once published: one prebuilt statement whatever the batch
#: size (an array parameter). Their followers' lookback restarted when they were claimed.
#: Planned on every call, never prepared: a generic plan, made while the follower table
#: was a page or two, can test the scope pin across the whole unique index
#: (follower_id, scope) and keep doing so as the table grows, until autovacuum next
#: analyses it; planned with its ids, the delete probes the primary key. Planning it
#: costs less than one page read of that scan, and it runs once per batch of releases.
FINISH = (
    delete(followers)
    .where(
        *sql.in_scope(followers),
        followers.c.id == func.any(bindparam("b_ids", type_=postgresql.ARRAY(BigInteger))),
    )
    .execution_options(**{UNPREPARED: True})
)


class PostgresStore(SQLStore):
    """The store on PostgreSQL; the module's docstring argues its safety."""

    insert: ClassVar[Any] = postgresql.insert
    record_sql: ClassVar[Any] = _RECORD
    claim_followers_sql: ClassVar[Any] = restarting(
        sql.claim_followers_statement(as_array=True), scoped=True
    )
    claim_lost_sql: ClassVar[Any] = restarting(sql.CLAIM_LOST, scoped=False)
    claim_stuck_sql: ClassVar[Any] = restarting(sql.CLAIM_STUCK, scoped=False)
    claim_due_one_sql: ClassVar[Any] = restarting(sql.CLAIM_DUE_ONE, scoped=True)
    claim_one_sql: ClassVar[Any] = restarting(sql.CLAIM_ONE, scoped=True)
    bury_sql: ClassVar[Any] = hk.bury_statement(postgresql.insert)
    record_tail_sql: ClassVar[Any] = record_tail_statement(postgresql.insert)
    remember_send_sql: ClassVar[Any] = remember_send_statement(postgresql.insert)

    def record_key(self, scope: str, key: str, task_id: str) -> str | None:
        # One statement: an earlier send's answer, or the new tail and its memory.
        params = {"b_scope": scope, "b_key": key, "b_task": task_id}
        ((known, known_previous, previous),) = self._fetch(PG_RECORD_KEY, params)
        return known_previous if known else previous  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _schema_lock(self, conn: Any) -> Iterator[None]:
        # One transaction, with a lock that ends with it: behind a transaction pooler each
        # autocommit statement may run on another server connection, so a session lock
        # taken by one statement and released by the next could be left held for good.
        # PostgreSQL's DDL is transactional, so the tables are created inside it.
        conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            yield

    def _park_once(self, values: dict[str, Any]) -> ParkOutcome | None:
        ((marked, had_row, inserted, had_claimed),) = self._fetch(PARK, values)
        if inserted:
            return ParkOutcome.PARKED
        # Not inserted: a row of this follower was there. The statement's INSERT waits
        # for a concurrent delete of it (a releaser's finish) and inserts once it is gone,
        # so a claimed row it did not insert over is still there, being released.
        if had_claimed:
            return ParkOutcome.RELEASING
        return ParkOutcome.PARKED if marked or had_row else None

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
        params = {
            "b_scope": scope,
            "b_task_id": task_id,
            "b_limit": limit,
            "b_failed": failed,
            "b_ttl": seen_ttl,
            "b_timeout": release_timeout,
        }
        rows = self._fetch(RECORD_AND_CLAIM, params)
        waited_at, seen_waited_at = rows[0][0], rows[0][1]
        if waited_at is None:
            return DoneRecord(waited=False, claimed=[], complete=True)
        claimed = release_order(claimed_row(row[2:]) for row in rows if row[2] is not None)
        # Complete only if no park committed after the snapshot the claim read, and the
        # batch was not cut short by the limit.
        complete = waited_at == seen_waited_at and limit > 0 and len(claimed) < limit
        return DoneRecord(True, claimed, complete)

    def finish(self, rows: Sequence[ClaimedFollower]) -> None:
        for scope, row_ids in by_scope(rows).items():
            self._fetch(FINISH, {"b_scope": scope, "b_ids": row_ids})

    def _tidy_counts(self) -> None:
        self._rowcount(TIDY_COUNTS, {})
