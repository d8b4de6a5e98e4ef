"""The store's prebuilt statements: SQLAlchemy Core with bound parameters, built once.

What each statement closes (which race, which crash window) is said where it is built;
``sql_store.py`` runs them and ``store.py`` states the protocol they implement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    LargeBinary,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from .sql_schema import db_clock, done, followers

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
)

#: The smallest step by which a mark moves waited_at forward (see DialectStatements.mark).
TICK = 1e-6


#: What a lookup answers per task id: succeeded, failed for good, or neither (NULL or 0).
DONE, FAILED = 1, 2

#: The row holds an outcome that still answers checks (a mark has no expires_at).
_LIVE = done.c.expires_at > db_clock()


def lookup_statement(count: int) -> Any:
    # One row whatever the answer: the clock plus one primary-key probe per asked id.
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


LOOKUPS = {count: lookup_statement(count) for count in (1, 2)}

#: The leader's outcome is recorded (done or failed) and has not expired.
_LEADER_SETTLED = exists().where(
    done.c.scope == bindparam("b_scope"), done.c.task_id == bindparam("b_leader"), _LIVE
)

TAKE_BACK = (
    delete(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
        followers.c.claimed_at.is_(None),
        _LEADER_SETTLED,
    )
    .returning(followers.c.id)
)


#: The row of a follower's leader, when the leader is itself a parked follower.
_leader_row = followers.alias("leader_row")
# OFFSET 0 keeps PostgreSQL from turning the test into an anti-join over the whole table
# (its row estimate for it is poor): it stays one unique-index probe per candidate row.
LEADER_PARKED = exists(
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
    could be swept as lost while that leader, just released, is still on its way. The
    deadline moves by the row's own lookback, the one its app set.
    """
    return (
        update(followers)
        .where(followers.c.id.in_(ids))
        .values(
            parked_at=db_clock(),
            deadline=db_clock() + followers.c.lookback,
        )
    )


def _waiting_behind(released: Any) -> Any:
    """Ids of the waiting followers of ``released`` rows (their scope and follower id).

    Not those of a released row whose own outcome is recorded already (it ran before its
    releaser got this far): that outcome governs them (its record claimed them, or the
    depth guard made them due), and a restart would undo the latter.
    """
    return (
        select(_leader_row.c.id)
        .where(
            _leader_row.c.scope == released.c.scope,
            _leader_row.c.leader_id == released.c.follower_id,
            _leader_row.c.claimed_at.is_(None),
            ~exists()
            .where(
                done.c.scope == released.c.scope,
                done.c.task_id == released.c.follower_id,
                or_(done.c.done_at.is_not(None), done.c.failed_at.is_not(None)),
            )
            .correlate_except(done),  # the released row is the enclosing query's
        )
        .order_by(_leader_row.c.occurred_at, _leader_row.c.follower_id)
    )


# PostgreSQL restarts the lookback when it claims (restarting() below), so the rows it
# deletes once published hold no lock on anyone's waiting followers.
FINISH_ANY = delete(followers).where(
    followers.c.id == func.any(bindparam("b_ids", type_=postgresql.ARRAY(BigInteger)))
)
_released_rows = (
    select(followers.c.scope, followers.c.follower_id)
    .where(followers.c.id.in_(bindparam("b_ids", expanding=True)))
    .subquery("released")
)
RESTART_IN = _restart_lookback(_waiting_behind(_released_rows))
FINISH_IN = delete(followers).where(followers.c.id.in_(bindparam("b_ids", expanding=True)))


def restarting(claim: Any) -> Any:
    """PostgreSQL: ``claim`` (an UPDATE ... RETURNING the follower columns), which also
    restarts the lookback of the claimed rows' waiting followers, in the same statement.

    Restarting when the row is claimed, not when it is deleted after its publish, closes a
    race: a released follower can run on another worker before its releaser deletes its
    row, and that follower's own claim skips rows another transaction holds locked. A
    restart made by the delete held its waiting followers' rows locked just then, so the
    claim missed them and they waited for the sweep. At claim time the claimed rows are
    not yet published: nobody else has a reason to claim their followers. Until the
    delete, the claimed row itself keeps its followers from being swept (LEADER_PARKED).
    """
    claimed = claim.cte("claimed")
    return select(*claimed.c).add_cte(_restart_behind(claimed))


def _restart_behind(claimed: Any) -> Any:
    """A CTE restarting the lookback of the waiting followers of ``claimed`` rows."""
    # OFFSET 0 keeps the planner from flattening the LATERAL into a hash join over the table,
    # and the leader index's order (_waiting_behind) makes that index its cheapest path even
    # in a plan cached while the table was nearly empty: without it, such a plan scanned
    # every waiting row through the parked_at index (PostgreSQL CPU in W3 +50 %).
    behind = _waiting_behind(claimed).offset(0).lateral("behind")
    return _restart_lookback(
        select(behind.c.id).select_from(claimed.join(behind, literal(True)))
    ).cte("restarted")


HAS_ROW = select(literal(1)).where(
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
        .returning(*FOLLOWER_COLUMNS)
    )


CLAIM_FOLLOWERS = _claim_statement(
    and_(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        followers.c.claimed_at.is_(None),
    ),
    (followers.c.occurred_at, followers.c.follower_id),
)
# Rows whose releaser died mid-release (claimed long ago) ...
CLAIM_STUCK = _claim_statement(
    and_(
        followers.c.claimed_at.is_not(None),
        followers.c.claimed_at < db_clock() - bindparam("b_timeout", type_=Double),
    ),
    (followers.c.claimed_at,),
)
# ... and lost followers: waiting past their deadline, earliest deadline first (each batch
# is then sorted by occurred time). A follower whose leader is itself parked is not lost:
# its leader came and waits in turn, and releases it once it has run. ``deadline < clock``
# is an index condition (the clock is stable within a statement): a sweep reads only rows
# that are due.
_DUE = and_(followers.c.claimed_at.is_(None), followers.c.deadline < db_clock())
CLAIM_LOST = _claim_statement(and_(_DUE, ~LEADER_PARKED), (followers.c.deadline,))

#: Waiting rows past their deadline held back by a parked leader: where a ring starts.
RING_CANDIDATES = (
    select(followers.c.id, followers.c.scope, followers.c.follower_id)
    .where(_DUE, LEADER_PARKED)
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

#: Claim one waiting row past its deadline by its key (the first of a ring).
CLAIM_DUE_ONE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.follower_id == bindparam("b_follower"),
        _DUE,
    )
    .values(claimed_at=db_clock())
    .returning(*FOLLOWER_COLUMNS)
)

#: Due rows behind a parked leader that lead to no ring wait a lookback more before the
#: ring search looks at them again: their deadline counts for nothing until their leader
#: leaves the table (a release restarts it then), and the search reaches the rows behind
#: them in later sweeps instead of the same first ones every time.
POSTPONE = (
    update(followers)
    .where(followers.c.id.in_(bindparam("b_ids", expanding=True)), _DUE)
    .values(deadline=db_clock() + followers.c.lookback)
)

#: A row that leaves the table without a release (forgotten, buried): its waiting
#: followers' deadlines are their own again (parked_at + lookback), whatever POSTPONE did.
UNPOSTPONE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        followers.c.claimed_at.is_(None),
    )
    .values(deadline=followers.c.parked_at + followers.c.lookback)
)

#: The depth guard leaves a leader's followers to the sweep: due at once.
MAKE_DUE = (
    update(followers)
    .where(
        followers.c.scope == bindparam("b_scope"),
        followers.c.leader_id == bindparam("b_leader"),
        followers.c.claimed_at.is_(None),
        followers.c.deadline > db_clock(),
    )
    .values(deadline=db_clock())
)


#: Nothing waits any more for these leaders: their release is over (most of them).
_RELEASED = and_(
    done.c.release_due_at < db_clock(),
    ~exists().where(
        followers.c.scope == done.c.scope,
        followers.c.leader_id == done.c.task_id,
        followers.c.claimed_at.is_(None),
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


def _older(column: Any) -> Any:
    return column <= db_clock() - bindparam("b_ttl", type_=Double)


# An outcome expires when the app that recorded it said (its own causal_seen_ttl).
EXPIRE_OUTCOMES = _expire(done.c.expires_at <= db_clock(), done.c.expires_at)
# A mark goes only once no follower row references it: a follower of a parked leader, or
# one whose lookback restarted, may wait longer than the seen TTL, and its leader's
# outcome must still find it through the mark (record_done returns waited_at).
EXPIRE_MARKS = _expire(
    and_(
        done.c.done_at.is_(None),
        done.c.failed_at.is_(None),
        _older(done.c.waited_at),
        ~exists().where(followers.c.scope == done.c.scope, followers.c.leader_id == done.c.task_id),
    ),
    done.c.waited_at,
)


class DialectStatements:
    """The statements whose form depends on the dialect (its INSERT ... ON CONFLICT)."""

    def __init__(self, is_postgresql: bool) -> None:
        insert: Callable[..., Any] = postgresql.insert if is_postgresql else sqlite.insert
        self.park_insert = (
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
            )
            # Parking is idempotent: a redelivered follower leaves the one row there is.
            .on_conflict_do_nothing(index_elements=["scope", "follower_id"])
        )
        # A follower marks its leader's row as waited for, unless the leader's outcome is
        # recorded (the WHERE leaves a done or failed row untouched and returns nothing).
        # An expired outcome counts as none, as in lookup(), and becomes a mark.
        mark = insert(done).values(
            scope=bindparam("b_scope"),
            task_id=bindparam("b_leader"),
            done_at=None,
            failed_at=None,
            expires_at=None,
            waited_at=db_clock(),
        )
        waited_at: Any = mark.excluded.waited_at
        if is_postgresql:
            # Every mark moves waited_at forward, even two taken in the same microsecond:
            # the done record compares the value it read in its snapshot with the latest
            # one to learn whether a park committed while it waited (record_and_claim).
            waited_at = func.greatest(waited_at, done.c.waited_at + TICK)
        self.mark = mark.on_conflict_do_update(
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
        self.park_in_one = self._park_statement(insert) if is_postgresql else None
        # PostgreSQL restarts the lookback of claimed rows' followers as it claims; SQLite
        # does it when the rows are deleted (it has no row locks for a claim to skip).
        wrap: Callable[[Any], Any] = restarting if is_postgresql else (lambda claim: claim)
        self.claim_followers = wrap(CLAIM_FOLLOWERS)
        self.claim_stuck = wrap(CLAIM_STUCK)
        self.claim_lost = wrap(CLAIM_LOST)
        self.restarting = wrap
        failed = bindparam("b_failed", type_=Boolean)
        row: Any = select(
            bindparam("b_scope"),
            bindparam("b_task_id"),
            case((failed, null()), else_=db_clock()),
            case((failed, db_clock()), else_=null()),
            db_clock() + bindparam("b_ttl", type_=Double),
            null(),
        )
        if is_postgresql:
            # The done record alone is committed without waiting for the WAL flush
            # (synchronous_commit off for this statement's transaction). It is visible at
            # once, which is all the park/release protocol needs; only a crash of the
            # PostgreSQL server can lose the last fraction of a second of them, and then a
            # follower waits for the sweep or a redelivered task runs again. Parked rows
            # are always flushed: their messages are acked once the row is committed.
            local = func.set_config("synchronous_commit", "off", True).label("setting")
            row = row.select_from(select(local).subquery("local_setting"))
        record = insert(done).from_select(
            ["scope", "task_id", "done_at", "failed_at", "expires_at", "waited_at"], row
        )
        # A task run again after its record expired refreshes it; a success after a failure
        # replaces it. RETURNING waited_at tells whether any follower marked the row before
        # this record: if none did, there is nothing to claim (a follower that parks later
        # finds the record and does not park). If one did, the release is due within the
        # release timeout: should this process die before it has claimed every follower
        # (after the record, between batches), the sweep claims the rest then, not a
        # lookback later (ORPHANED_LEADERS).
        self.record_done = record.on_conflict_do_update(
            index_elements=["scope", "task_id"],
            set_={
                "done_at": record.excluded.done_at,
                "failed_at": record.excluded.failed_at,
                "expires_at": record.excluded.expires_at,
                "release_due_at": case(
                    (
                        done.c.waited_at.is_not(None),
                        db_clock() + bindparam("b_timeout", type_=Double),
                    ),
                    else_=null(),
                ),
            },
        ).returning(done.c.waited_at)
        self.record_and_claim = self._record_and_claim_statement() if is_postgresql else None

    def _park_statement(self, insert: Callable[..., Any]) -> Any:
        """PostgreSQL: mark the leader's row and insert the follower in one statement."""
        mark = self.mark.cte("mark")
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
        ).where(exists(select(mark)))
        parked = (
            insert(followers)
            .from_select(
                [
                    "scope",
                    "follower_id",
                    "leader_id",
                    "task_name",
                    "occurred_at",
                    "parked_at",
                    "lookback",
                    "deadline",
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
        record = self.record_done.cte("record")
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
            .returning(*FOLLOWER_COLUMNS)
            .cte("claimed")
        )
        # As in restarting(): the claimed rows' own waiting followers start their lookback
        # again now, not when the claimed rows are deleted.
        return (
            select(
                record.c.waited_at,
                snapshot.scalar_subquery().label("seen_waited_at"),
                *claimed.c,
            )
            .select_from(record.outerjoin(claimed, literal(True)))
            .add_cte(_restart_behind(claimed))
        )
