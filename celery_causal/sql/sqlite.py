"""The store on SQLite, the embedded default: a park in three steps, a record then a claim.

How a follower and its leader never strand each other
-----------------------------------------------------
The interleaving to close is PostgreSQL's (see ``postgresql.py``): the follower read "not
done", then the leader recorded its outcome and looked for followers before the
follower's row existed. Both sides write the leader's row in ``causal_done`` with INSERT
... ON CONFLICT; SQLite runs one writer at a time over the whole file (WAL,
``busy_timeout``), so each statement sees every commit before it.

SQLite cannot put the mark and the follower's row in one statement, so a park is three
statements on one connection, each committed on its own:

1. the **mark** on the leader's row, unless an outcome is recorded there (then nothing is
   written and the follower runs, or meets its leader's failure);
2. the follower's **row**;
3. the **take-back**: if the leader's outcome is recorded by now, the follower deletes
   its own row again (if still waiting) and runs instead.

A leader's **record** returns the row's ``waited_at``; if a follower marked it, the
leader's **claim** follows in a statement of its own, committed after the record.

- Mark before record: the record returns ``waited_at`` and the leader claims. If the
  follower's row committed before that claim, the claim takes it. If not, the row
  commits after the record, so the take-back (after the row) sees the record and takes
  the row back: the follower runs.
- Record before mark: the mark finds the outcome and the follower does not park.

``claimed_at IS NULL`` in both the claim and the take-back makes them exclusive: exactly
one moves the row out of waiting. A park whose insert met an earlier row of the same
follower reports that row's state (waiting: ``PARKED``; claimed: ``RELEASING``); a park
that inserted its own row is ``PARKED`` whatever its leader did with the row since.

A release restarts the lookback of the released rows' own followers just before the rows
are deleted once published (:meth:`SQLiteStore.finish`): SQLite has no row locks for a
concurrent claim to skip. A crash between restart and delete leaves the rows claimed (the
sweep republishes them) and their followers waiting a little longer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from sqlalchemy import bindparam, delete, select
from sqlalchemy.dialects import sqlite

from ..store import DEFAULT_SEEN_TTL, ClaimedFollower, DoneRecord, ParkOutcome
from . import housekeeping as hk
from . import statements as sql
from .keys import record_tail_statement, remember_send_statement
from .schema import followers
from .store import SQLStore, by_scope

_MARK = sql.mark_statement(sqlite.insert, strictly_later=False)
_PARK_ROW = sql.park_insert(sqlite.insert)
ROW_CLAIMED = select(followers.c.claimed_at.is_not(None)).where(
    followers.c.scope == bindparam("b_scope"),
    followers.c.follower_id == bindparam("b_follower"),
)
TAKE_BACK = (
    delete(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
        sql.WAITING,
        sql.LEADER_SETTLED,
    )
    .returning(followers.c.id)
)
_ROWS = (*sql.in_scope(followers), followers.c.id.in_(bindparam("b_ids", expanding=True)))
_released_rows = (
    select(followers.c.scope, followers.c.follower_id).where(*_ROWS).subquery("released")
)
_heads = sql.marked(_released_rows, scoped=True).subquery("heads")
RESTART_BEHIND = sql.restart_lookback(sql.waiting_behind(_heads, scoped=True), scoped=True)
FINISH = delete(followers).where(*_ROWS)


class SQLiteStore(SQLStore):
    """The store on SQLite; the module's docstring argues its safety."""

    insert: ClassVar[Any] = sqlite.insert
    record_sql: ClassVar[Any] = sql.record_statement(sqlite.insert, relaxed_commit=False)
    claim_followers_sql: ClassVar[Any] = sql.CLAIM_FOLLOWERS
    claim_lost_sql: ClassVar[Any] = sql.CLAIM_LOST
    claim_stuck_sql: ClassVar[Any] = sql.CLAIM_STUCK
    claim_due_one_sql: ClassVar[Any] = sql.CLAIM_DUE_ONE
    claim_one_sql: ClassVar[Any] = sql.CLAIM_ONE
    bury_sql: ClassVar[Any] = hk.bury_statement(sqlite.insert)
    record_tail_sql: ClassVar[Any] = record_tail_statement(sqlite.insert)
    remember_send_sql: ClassVar[Any] = remember_send_statement(sqlite.insert)

    @contextlib.contextmanager
    def _schema_lock(self, conn: Any) -> Iterator[None]:
        # SQLite's write lock, taken before the schema is read: processes that start at
        # once create it one after the other, each seeing what the previous one made.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")

    def _park_once(self, values: dict[str, Any]) -> ParkOutcome | None:
        def row_state(conn: Any) -> ParkOutcome | None:
            row = conn.execute(ROW_CLAIMED, values).first()
            if row is None:
                return None
            return ParkOutcome.RELEASING if row[0] else ParkOutcome.PARKED

        def mark_row_take_back(conn: Any) -> ParkOutcome | None:
            if conn.execute(_MARK, values).first() is None:
                # An outcome is recorded, or a redelivery finds the row it parked before.
                return row_state(conn)
            inserted = conn.execute(_PARK_ROW, values).rowcount == 1
            if conn.execute(TAKE_BACK, values).first() is not None:
                return None
            # This park's own row, if it inserted one, is parked whatever happened to it
            # since (its leader may have claimed it already); an earlier delivery's row
            # says whether it is being released.
            return ParkOutcome.PARKED if inserted else row_state(conn)

        return self._run(mark_row_take_back)

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
        # The claim's statement starts after the record committed: it sees every row whose
        # mark the record found (the module's docstring).
        if not self.record_done(
            scope, task_id, failed=failed, seen_ttl=seen_ttl, release_timeout=release_timeout
        ):
            return DoneRecord(waited=False, claimed=[], complete=True)
        claimed = self.claim_followers(scope, task_id, limit) if limit else []
        return DoneRecord(True, claimed, complete=limit > 0 and len(claimed) < limit)

    def finish(self, rows: Sequence[ClaimedFollower]) -> None:
        def run(conn: Any) -> None:
            for scope, row_ids in by_scope(rows).items():
                ids = {"b_scope": scope, "b_ids": row_ids}
                conn.execute(RESTART_BEHIND, ids)
                conn.execute(FINISH, ids)

        if rows:
            self._run(run)
