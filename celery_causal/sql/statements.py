"""The SQL store's statements: SQLAlchemy Core with bound parameters, built once.

The protocol's statements both dialects run are here, named, with the one definition of
waiting, due, lost and stuck; what each closes (which race, which crash window) is said
where it is built. The statements only one dialect runs sit next to the race argument
they serve: PostgreSQL's one-statement park and record-and-claim in ``postgresql.py``,
SQLite's take-back in ``sqlite.py``. The sweep's housekeeping and the operators' queries
are in ``housekeeping.py``. The contract they implement is ``celery_causal/store.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Double,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    tuple_,
    update,
)

from .schema import WAITING_BY_DEADLINE, db_clock, done, followers

Insert = Callable[..., Any]  # postgresql.insert or sqlite.insert: both have ON CONFLICT

FOLLOWER_COLUMNS = (
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
    followers.c.ordering_key,
)

#: What a lookup answers per task id: succeeded, failed for good, or neither (NULL or 0).
DONE, FAILED = 1, 2

#: The row holds an outcome that still answers checks (a mark has no expires_at).
_LIVE = done.c.expires_at > db_clock()


def in_scope(table: Any, scoped: bool = True) -> tuple[Any, ...]:
    """The filter ``scope = :b_scope`` on ``table`` (or on nothing, unless ``scoped``).

    Every statement of the park, release and duplicate paths has it on each table it
    touches, even where a join already implies the scope: a distributed PostgreSQL such as
    Citus, with ``scope`` as distribution column, then routes each of them to one node
    (ARCHITECTURE.md, "Past one PostgreSQL"; ``tests/unit/test_routable.py`` checks it).
    """
    return (table.c.scope == bindparam("b_scope"),) if scoped else ()


@functools.cache
def lookup_statement(count: int) -> Any:
    """One row whatever the answer: the clock plus one primary-key probe per asked id.

    Kept for the process: the store caches compiled statements by their identity, which a
    statement built afresh for each call could share with an earlier, freed one.
    """
    state = case(
        (and_(_LIVE, done.c.done_at.is_not(None)), literal(DONE)),
        (and_(_LIVE, done.c.failed_at.is_not(None)), literal(FAILED)),
        else_=literal(0),
    )
    return select(
        db_clock().label("now"),
        *(
            select(state)
            .where(done.c.scope == bindparam("b_scope"), done.c.task_id == bindparam(f"t{i}"))
            .scalar_subquery()
            .label(f"d{i}")
            for i in range(count)
        ),
    )


#: The leader's outcome is recorded (done or failed) and has not expired.
LEADER_SETTLED = exists().where(
    done.c.scope == bindparam("b_scope"), done.c.task_id == bindparam("b_leader"), _LIVE
)

# -- the meeting point: a follower's mark, a leader's record ---------------------------------


def park_insert(insert: Insert) -> Any:
    """Insert the follower's row; parking is idempotent (a redelivery leaves the one row)."""
    return (
        insert(followers)
        .values(
            scope=bindparam("b_scope"),
            follower_id=bindparam("b_follower"),
            leader_id=bindparam("b_leader"),
            task_name=bindparam("b_task"),
            occurred_at=bindparam("b_occurred"),
            parked_at=db_clock(),
            lookback=bindparam("b_lookback", type_=Double),
            deadline=db_clock() + bindparam("b_lookback", type_=Double),
            content_type=bindparam("b_ctype"),
            content_encoding=bindparam("b_cenc"),
            payload=bindparam("b_payload"),
            hostname=bindparam("b_host"),
            ordering_key=bindparam("b_key"),
        )
        .on_conflict_do_nothing(index_elements=["follower_id", "scope"])
    )


#: The smallest step by which a mark moves waited_at forward (see :func:`mark_statement`).
TICK = 1e-6


def mark_statement(insert: Insert, *, strictly_later: bool) -> Any:
    """A follower marks its leader's row as waited for, unless the leader's outcome is
    recorded: the WHERE leaves a done or failed row untouched and returns nothing. An
    expired outcome counts as none, as in a lookup, and becomes a mark.

    With ``strictly_later`` every mark moves waited_at forward, even two taken in the same
    microsecond: PostgreSQL's done record compares the value it read in its snapshot with
    the latest one to learn whether a park committed while it waited.
    """
    mark = insert(done).values(
        scope=bindparam("b_scope"),
        task_id=bindparam("b_leader"),
        done_at=None,
        failed_at=None,
        expires_at=None,
        waited_at=db_clock(),
    )
    waited_at: Any = mark.excluded.waited_at
    if strictly_later:
        waited_at = func.greatest(waited_at, done.c.waited_at + TICK)
    return mark.on_conflict_do_update(
        index_elements=["scope", "task_id"],
        set_={
            "waited_at": waited_at,
            "done_at": None,
            "failed_at": None,
            "expires_at": None,
            "release_due_at": None,  # an expired outcome's release is not this one
        },
        where=or_(done.c.expires_at.is_(None), done.c.expires_at <= db_clock()),
    ).returning(literal(1))


def record_statement(insert: Insert, *, relaxed_commit: bool) -> Any:
    """A leader's outcome (``b_failed``), returning the row's waited_at.

    A task run again after its record expired refreshes it; a success after a failure
    replaces it. RETURNING waited_at tells whether any follower marked the row before this
    record: if none did, there is nothing to claim (a follower that parks later finds the
    record and does not park). If one did, the release is due within the release timeout:
    should the releaser die before it has claimed every follower (after the record,
    between batches), the sweep claims the rest then, not a lookback later
    (ORPHANED_LEADERS).

    With ``relaxed_commit`` (PostgreSQL) the record alone is committed without waiting for
    the WAL flush (synchronous_commit off for this statement's transaction). It is visible
    at once, which is all the protocol needs; only a crash of the server can lose the last
    fraction of a second of them, and then a follower waits for the sweep or a redelivered
    task runs again. Parked rows are always flushed: their messages are acked once the row
    is committed.
    """
    failed = bindparam("b_failed", type_=Boolean)
    row: Any = select(
        bindparam("b_scope"),
        bindparam("b_task_id"),
        case((failed, null()), else_=db_clock()),
        case((failed, db_clock()), else_=null()),
        db_clock() + bindparam("b_ttl", type_=Double),
        null(),
    )
    if relaxed_commit:
        local = func.set_config("synchronous_commit", "off", True).label("setting")
        row = row.select_from(select(local).subquery("local_setting"))
    record = insert(done).from_select(
        ["scope", "task_id", "done_at", "failed_at", "expires_at", "waited_at"], row
    )
    due = db_clock() + bindparam("b_timeout", type_=Double)
    return record.on_conflict_do_update(
        index_elements=["scope", "task_id"],
        set_={
            "done_at": record.excluded.done_at,
            "failed_at": record.excluded.failed_at,
            "expires_at": record.excluded.expires_at,
            "release_due_at": case((done.c.waited_at.is_not(None), due), else_=null()),
        },
    ).returning(done.c.waited_at)


# -- releases ----------------------------------------------------------------------------

#: The row of a follower's leader, when the leader is itself a parked follower.
leader_row = followers.alias("leader_row")
# OFFSET 0 keeps PostgreSQL from turning the test into an anti-join over the whole table
# (its row estimate for it is poor): it stays one unique-index probe per candidate row.
LEADER_PARKED = exists(
    select(literal(1))
    .where(
        leader_row.c.scope == followers.c.scope,
        leader_row.c.follower_id == followers.c.leader_id,
    )
    .offset(0)
)

#: Waiting: no releaser holds the row.
WAITING = followers.c.claimed_at.is_(None)
#: Stuck: claimed longer than the release timeout ago; its releaser died mid-release.
STUCK = and_(
    followers.c.claimed_at.is_not(None),
    followers.c.claimed_at < db_clock() - bindparam("b_timeout", type_=Double),
)
#: Due: waiting past its deadline, read from the due index (``schema.WAITING_BY_DEADLINE``).
#: ``deadline < clock`` is an index condition (the clock is stable within a statement): a
#: sweep reads only rows that are due.
DUE = and_(WAITING_BY_DEADLINE, followers.c.deadline < db_clock())
#: Lost: due, and its leader is not itself parked. A follower of a parked leader is not
#: lost: its leader came and waits in turn, and releases it once it has run.
LOST = and_(DUE, ~LEADER_PARKED)


def restart_lookback(ids: Any, *, scoped: bool = False) -> Any:
    """Followers of released rows start their lookback again: their leader has come.

    Without it, a follower whose leader was parked (a chain whose first task never came)
    could be swept as lost while that leader, just released, is still on its way. The
    deadline moves by the row's own lookback, the one its app set. ``scoped``: the
    released rows are all of scope ``b_scope`` (see :func:`in_scope`).
    """
    return (
        update(followers)
        .where(followers.c.id.in_(ids), *in_scope(followers, scoped))
        .values(parked_at=db_clock(), deadline=db_clock() + followers.c.lookback)
    )


def marked(released: Any, *, scoped: bool = False) -> Any:
    """The ``released`` rows (scope, follower id) that followers may wait behind: those
    whose own task id holds a mark.

    A follower parks only by marking its leader's row, and neither a mark nor an outcome
    leaves causal_done while a follower row references it (``housekeeping``'s expiry), so a
    released row without a row there has nobody waiting behind it (most rows: a lookup by
    primary key each, before any of their followers is looked for). Not a
    released row whose own outcome is recorded already (it ran before its releaser got this
    far): that outcome governs its followers (its record claimed them, or the depth guard
    made them due), and a restart would undo the latter.

    The probe is a scalar subquery, which PostgreSQL runs per released row and never turns
    into a join, and it tests the outcome columns in its result, not in its WHERE: so no
    index but the primary key can serve it. With the test in the WHERE, the index of marks
    (``causal_done_waiting_idx``, whose condition that test implies) qualifies too, and a
    plan made while that index was small reads it whole for each released row.
    """
    state = (
        select(
            case(
                (and_(done.c.done_at.is_(None), done.c.failed_at.is_(None)), literal(1)),
                else_=literal(0),
            )
        )
        .where(
            done.c.scope == released.c.scope,
            done.c.task_id == released.c.follower_id,
            *in_scope(done, scoped),
        )
        .scalar_subquery()
    )
    return select(released.c.scope, released.c.follower_id).where(state == 1)


def waiting_behind(heads: Any, *, scoped: bool = False) -> Any:
    """Ids of the waiting followers of ``heads`` (scope, follower id: see :func:`marked`)."""
    return (
        select(leader_row.c.id)
        .where(
            leader_row.c.scope == heads.c.scope,
            leader_row.c.leader_id == heads.c.follower_id,
            leader_row.c.claimed_at.is_(None),
            *in_scope(leader_row, scoped),
        )
        .order_by(leader_row.c.occurred_at, leader_row.c.follower_id)
    )


def claimable(ids: Any, name: str) -> Any:
    """The ids a claim takes (a SELECT ... LIMIT ... FOR UPDATE SKIP LOCKED), as a CTE that
    PostgreSQL runs once per statement.

    As a plain subquery, the planner may run it again for each row the UPDATE tests (a
    semi-join); each run skips the rows locked so far, this statement's own included, and
    returns the next ones, so the claim would take rows past its LIMIT.
    """
    return ids.cte(name).prefix_with("MATERIALIZED", dialect="postgresql")


#: A leader's followers in the order a release claims them (the leader index's order).
LEADER_ORDER = (followers.c.occurred_at, followers.c.follower_id)


def in_claimable(ids: Any, *, as_array: bool = False) -> Any:
    """The UPDATE's test that a row is one the claimable CTE ``ids`` took.

    ``as_array`` (PostgreSQL): against one array of the ids, built once per statement. As
    ``IN (SELECT ...)`` PostgreSQL may join the table to the CTE, and a plan that reads
    the rows first (see :func:`within_leader_claim`) would then scan the CTE again for each
    row it reads: the batch size squared, 17 ms a batch of 500, against under 1 ms.
    """
    if not as_array:
        return followers.c.id.in_(select(ids.c.id))
    taken = select(func.array_agg(ids.c.id)).scalar_subquery()
    return followers.c.id == func.any(cast(taken, ARRAY(BigInteger)))


def _claim_statement(
    where: Any,
    order_by: Any,
    *,
    scoped: bool,
    also: Callable[[Any], Any] | None = None,
    as_array: bool = False,
) -> Any:
    # SKIP LOCKED: concurrent claimers (two sweeps, a sweep and a leader) take disjoint
    # rows instead of waiting on each other; the claim is one UPDATE, so a row is never
    # selected by one statement and taken by another.
    ids = claimable(
        select(followers.c.id, *order_by)
        .where(where)
        .order_by(*order_by)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True),
        "claimable",
    )
    return (
        update(followers)
        .where(
            in_claimable(ids, as_array=as_array),
            *in_scope(followers, scoped),
            *(also(ids) if also is not None else ()),
        )
        .values(claimed_at=db_clock())
        .returning(*FOLLOWER_COLUMNS)
    )


def within_leader_claim(ids: Any, leader: Any) -> tuple[Any, ...]:
    """What the UPDATE of a leader's claim repeats of the rows ``ids`` (a claimable CTE in
    :data:`LEADER_ORDER`) took: their leader, and the claim order's range up to the last.

    Whatever plan PostgreSQL keeps for the UPDATE (a generic plan, or one made before the
    table had statistics, may find the rows through the leader index and test each
    against the ids), it then reads the leader's followers up to the batch's last one,
    never the whole scope, nor all of a leader's 10,000 followers for each batch of 500.
    Every claimed row is within both, so the UPDATE takes exactly the rows ``ids`` locked.
    """
    last = (
        select(ids.c.occurred_at, ids.c.follower_id)
        .order_by(ids.c.occurred_at.desc(), ids.c.follower_id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (followers.c.leader_id == leader, tuple_(*LEADER_ORDER) <= last)


def claim_followers_statement(*, as_array: bool = False) -> Any:
    """A leader's next batch of waiting followers (``as_array``: see :func:`in_claimable`)."""
    return _claim_statement(
        and_(
            followers.c.scope == bindparam("b_scope"),
            followers.c.leader_id == bindparam("b_leader"),
            WAITING,
        ),
        LEADER_ORDER,
        scoped=True,
        also=lambda ids: within_leader_claim(ids, bindparam("b_leader")),
        as_array=as_array,
    )


CLAIM_FOLLOWERS = claim_followers_statement()
CLAIM_STUCK = _claim_statement(STUCK, (followers.c.claimed_at,), scoped=False)
# Earliest deadline first; each batch is then sorted by occurred time.
CLAIM_LOST = _claim_statement(LOST, (followers.c.deadline,), scoped=False)

#: Claim one waiting row past its deadline by its key (the first of a ring).
CLAIM_DUE_ONE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
        DUE,
    )
    .values(claimed_at=db_clock())
    .returning(*FOLLOWER_COLUMNS)
)
#: An operator's release: one row by its key, whatever its state.
CLAIM_ONE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
    )
    .values(claimed_at=db_clock())
    .returning(*FOLLOWER_COLUMNS)
)
UNCLAIM = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.id.in_(bindparam("b_ids", expanding=True)),
    )
    .values(claimed_at=None)
)

#: The depth guard leaves a leader's followers to the sweep: due at once.
MAKE_DUE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        WAITING,
        followers.c.deadline > db_clock(),
    )
    .values(deadline=db_clock())
)
