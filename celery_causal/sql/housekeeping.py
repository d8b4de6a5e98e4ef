"""The SQL store's statements for housekeeping: the sweep's ring search, orphaned
releases and expiry, and the operators' queries. The protocol's own statements, and the
definitions of waiting, due, lost and stuck these share, are in ``statements.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import (
    Double,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    literal_column,
    select,
    tuple_,
    union_all,
    update,
)

from ..store import Follower
from .schema import OLDEST_PARK, db_clock, dead_followers, done, followers, scope_counts
from .statements import DUE, LEADER_PARKED, LOST, STUCK, WAITING, Insert

# -- rings ---------------------------------------------------------------------------------

#: Due rows held back by a parked leader: where a ring starts.
RING_CANDIDATES = (
    select(followers.c.id, followers.c.scope, followers.c.follower_id)
    .where(DUE, LEADER_PARKED)
    .order_by(followers.c.deadline)
    .limit(bindparam("b_limit"))
)


def _leader_walk() -> Any:
    """The rows reachable from ``b_ids`` by following leader links through parked rows.

    UNION (not UNION ALL) drops rows already reached, so the walk ends on a ring.
    """
    link = (followers.c.scope, followers.c.follower_id, followers.c.leader_id)
    start = select(*link, followers.c.occurred_at).where(
        followers.c.id.in_(bindparam("b_ids", expanding=True))
    )
    walk = start.cte("walk", recursive=True)
    step = select(*link, followers.c.occurred_at).join(
        walk,
        and_(followers.c.scope == walk.c.scope, followers.c.follower_id == walk.c.leader_id),
    )
    walk = walk.union(step)
    return select(walk.c.scope, walk.c.follower_id, walk.c.leader_id, walk.c.occurred_at)


LEADER_WALK = _leader_walk()

#: Due rows behind a parked leader that lead to no ring wait a lookback more before the
#: ring search looks at them again: their deadline counts for nothing until their leader
#: leaves the table (a release restarts it then), and the search reaches the rows behind
#: them in later sweeps instead of the same first ones every time.
POSTPONE = (
    update(followers)
    .where(followers.c.id.in_(bindparam("b_ids", expanding=True)), DUE)
    .values(deadline=db_clock() + followers.c.lookback)
)

#: A row that leaves the table without a release (forgotten, buried): its waiting
#: followers' deadlines are their own again (parked_at + lookback), whatever POSTPONE did.
UNPOSTPONE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        WAITING,
    )
    .values(deadline=followers.c.parked_at + followers.c.lookback)
)

# -- orphaned releases ---------------------------------------------------------------------

#: Nothing waits any more for these leaders: their release is over (most of them).
#: OFFSET 0 keeps the test a probe of the leader index per leader: as an anti-join, a plan
#: made without statistics reads every waiting row of the table into a hash or a loop.
_RELEASED = and_(
    done.c.release_due_at < db_clock(),
    ~exists(
        select(literal(1))
        .where(
            followers.c.scope == done.c.scope,
            followers.c.leader_id == done.c.task_id,
            WAITING,
        )
        .offset(0)
    ),
)
CLEAR_RELEASES = (
    update(done)
    .where(
        tuple_(done.c.scope, done.c.task_id).in_(
            select(done.c.scope, done.c.task_id)
            .where(_RELEASED)
            .order_by(done.c.release_due_at)
            .limit(bindparam("b_limit"))
            .with_for_update(skip_locked=True)
        ),
        _RELEASED,
    )
    .values(release_due_at=None)
)
#: Leaders whose release is overdue and that followers still wait for: their releaser died
#: after the record (Celery acks a task whose success is stored even when its worker is
#: lost, so no redelivery finishes the release).
ORPHANED_LEADERS = (
    select(done.c.scope, done.c.task_id)
    .where(done.c.release_due_at < db_clock())
    .order_by(done.c.release_due_at)
    .limit(bindparam("b_limit"))
)

# -- expiry --------------------------------------------------------------------------------


def _expire(where: Any, order_by: Any) -> Any:
    """Delete up to ``b_limit`` rows of causal_done matching ``where``, oldest first.

    ``where`` is tested twice: in the subquery that picks the rows (locked, skipping rows
    another transaction holds), and again on each row as it is deleted. Under READ
    COMMITTED a DELETE that waited for a row lock goes on with the row's newest version; a
    test made only in the subquery would delete a done record or a mark written meanwhile
    (a leader's record, a follower's park) because an older version of it was expired.
    """
    old = (
        select(done.c.scope, done.c.task_id)
        .where(where)
        .order_by(order_by)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True)
    )
    return delete(done).where(tuple_(done.c.scope, done.c.task_id).in_(old), where)


#: No follower row (waiting or being released) references the row.
_UNREFERENCED = ~exists().where(
    followers.c.scope == done.c.scope, followers.c.leader_id == done.c.task_id
)
# An outcome expires when the app that recorded it said (its own causal_seen_ttl), once no
# follower row references it: followers its releaser left (it died after the record) are
# the orphan handover's, and until then the outcome tells every release that they are
# not to be restarted (statements.marked).
EXPIRE_OUTCOMES = _expire(and_(done.c.expires_at <= db_clock(), _UNREFERENCED), done.c.expires_at)
# A mark goes only once no follower row references it: a follower of a parked leader, or
# one whose lookback restarted, may wait longer than the seen TTL, and its leader's
# outcome must still find it through the mark (the record returns waited_at).
EXPIRE_MARKS = _expire(
    and_(
        done.c.done_at.is_(None),
        done.c.failed_at.is_(None),
        done.c.waited_at <= db_clock() - bindparam("b_ttl", type_=Double),
        _UNREFERENCED,
    ),
    done.c.waited_at,
)

# -- operators -----------------------------------------------------------------------------

#: One follower's row removed, returned as it was stored (an operator's forget).
FORGET = (
    delete(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
    )
    .returning(*(followers.c[f.name] for f in dataclasses.fields(Follower)))
)
_DEAD_COPIED = [c.name for c in dead_followers.c if c.name not in ("died_at", "reason")]


def bury_statement(insert: Insert) -> Any:
    """Copy a follower row (``b_scope``, ``b_id``) aside with ``b_reason``; a second copy
    is a no-op."""
    source = select(
        *(followers.c[name] for name in _DEAD_COPIED),
        db_clock().label("died_at"),
        bindparam("b_reason").label("reason"),
    ).where(followers.c.scope == bindparam("b_scope"), followers.c.id == bindparam("b_id"))
    return (
        insert(dead_followers)
        .from_select([*_DEAD_COPIED, "died_at", "reason"], source)
        # No conflict target: whatever key the table has (its id here; scope and id where
        # the table is distributed by scope), a second copy of the row is a no-op.
        .on_conflict_do_nothing()
    )


REMOVE_ROW = (
    delete(followers)
    .where(followers.c.scope == bindparam("b_scope"), followers.c.id == bindparam("b_id"))
    .returning(followers.c.follower_id)
)
COUNT_WAITING = select(func.count()).where(
    followers.c.scope == bindparam("b_scope"),
    followers.c.leader_id == bindparam("b_leader"),
    WAITING,
)


def _stats_statement() -> Any:
    """Per scope: waiting, releasing, oldest waiting park, overdue (lost), stuck.

    Each part is read from where its rows are few, so the cost follows the number of
    scopes and of rows in trouble, not the table: the rows per scope from their counts
    (``counts.py``); the claimed ones from the claimed index (a release deletes them once
    published); the lost ones from the due index's range of rows already due (the
    sweep releases them); each scope's oldest waiting park by one probe of the oldest-park
    index. Waiting is the scope's rows less its claimed ones. One statement, so the parts
    see one snapshot.
    """
    zero: Any = literal_column("0")
    rows = select(
        scope_counts.c.scope.label("scope"),
        scope_counts.c.parked.label("parked"),
        zero.label("releasing"),
        zero.label("lost"),
        zero.label("stuck"),
    )
    claimed = (
        select(followers.c.scope, zero, func.count(), zero, func.sum(case((STUCK, 1), else_=0)))
        .where(followers.c.claimed_at.is_not(None))
        .group_by(followers.c.scope)
    )
    lost = (
        select(followers.c.scope, zero, zero, func.count(), zero)
        .where(LOST)
        .group_by(followers.c.scope)
    )
    parts = union_all(rows, claimed, lost).subquery("parts")
    oldest = (
        select(func.min(followers.c.parked_at))
        .where(followers.c.scope == parts.c.scope, OLDEST_PARK)
        .scalar_subquery()
    )
    releasing = func.sum(parts.c.releasing)
    return (
        select(
            parts.c.scope,
            func.sum(parts.c.parked) - releasing,
            releasing,
            oldest,
            func.sum(parts.c.lost),
            func.sum(parts.c.stuck),
        )
        .group_by(parts.c.scope)
        .having(func.sum(parts.c.parked) > 0)
        .order_by(parts.c.scope)
    )


STATS = _stats_statement()


#: Counts at zero (as many rows left as came), on SQLite: one writer at a time, one shard.
#: PostgreSQL tidies its shards with TIDY_COUNTS.
DROP_EMPTY_COUNTS = delete(scope_counts).where(scope_counts.c.parked == 0)
DEAD_PER_SCOPE = select(dead_followers.c.scope, func.count()).group_by(dead_followers.c.scope)
SCOPES_OF = (
    select(followers.c.scope)
    .where(followers.c.follower_id == bindparam("b_follower"))
    .order_by(followers.c.scope)
)
CLOCK = select(db_clock())


def _matching(stmt: Any, *, by_scope: bool, by_leader: bool, by_key: bool) -> Any:
    """``stmt`` on the follower rows of ``b_scope``, ``b_leader`` and/or ``b_key``.

    By leader, the leader index serves it; by scope alone or by key, the table is read
    (no index they may use leads with scope, see ``schema.py``): an operator's command, not
    a task's.
    """
    if by_scope:
        stmt = stmt.where(followers.c.scope == bindparam("b_scope"))
    if by_leader:
        stmt = stmt.where(followers.c.leader_id == bindparam("b_leader"))
    if by_key:
        stmt = stmt.where(followers.c.ordering_key == bindparam("b_key"))
    return stmt


def list_statement(
    columns: list[str], *, by_scope: bool, by_leader: bool, by_key: bool = False
) -> Any:
    """Rows, oldest parked first, filtered by ``b_scope``, ``b_leader`` and/or ``b_key``."""
    stmt = _matching(
        select(*(followers.c[name] for name in columns)),
        by_scope=by_scope,
        by_leader=by_leader,
        by_key=by_key,
    )
    return stmt.order_by(followers.c.parked_at, followers.c.id).limit(bindparam("b_limit"))


def count_statement(*, by_scope: bool, by_leader: bool, by_key: bool = False) -> Any:
    """How many rows :func:`list_statement` would select without its limit."""
    stmt = select(func.count()).select_from(followers)
    return _matching(stmt, by_scope=by_scope, by_leader=by_leader, by_key=by_key)


def follower_statement(columns: list[str]) -> Any:
    """One row by its key (``b_scope``, ``b_follower``)."""
    return select(*(followers.c[name] for name in columns)).where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
    )
