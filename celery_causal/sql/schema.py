"""Tables and indexes of the SQL store, and the database clock expression."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    and_,
    inspect,
    literal_column,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, DropIndex
from sqlalchemy.sql.functions import FunctionElement

from ..store import MAX_ID_LENGTH
from . import counts

metadata = MetaData()

_Id = String(MAX_ID_LENGTH)


def _message_columns() -> list[Column[object]]:
    """The columns of a parked message, shared by the follower and dead-follower tables."""
    return [
        Column("scope", _Id, nullable=False),
        Column("follower_id", _Id, nullable=False),
        Column("leader_id", _Id, nullable=False),
        Column("task_name", _Id, nullable=False),
        Column("occurred_at", Double, nullable=False),
        Column("parked_at", Double, nullable=False),
        Column("content_type", String(128), nullable=False),
        Column("content_encoding", String(64), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("hostname", _Id, nullable=False, server_default=""),
        Column("ordering_key", _Id, nullable=True),
    ]


_RowId = BigInteger().with_variant(Integer, "sqlite")

#: Parked followers. ``claimed_at IS NULL`` means waiting; set means a releaser claimed the
#: row and is publishing it (the outbox state); the row is deleted once published.
#: Row ids are never reused (a PostgreSQL sequence; AUTOINCREMENT on SQLite, whose plain
#: rowids come back after a delete): a releaser that stalled past its claim deletes by id,
#: and must not hit a newer row that took over the id of the one it published.
followers = Table(
    "causal_followers",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    *_message_columns(),
    #: How long it waits for its leader: the ``causal_lookback`` of the app that parked it.
    Column("lookback", Double, nullable=False),
    #: When the sweep may release the row as lost (store clock): its park time plus its
    #: lookback, moved when its lookback restarts.
    Column("deadline", Double, nullable=False),
    Column("claimed_at", Double, nullable=True),
    # Parking is idempotent: a redelivered follower hits this key (ON CONFLICT DO NOTHING).
    # follower_id first, for the reason the leader index gives.
    UniqueConstraint("follower_id", "scope", name="causal_followers_follower_scope_key"),
    sqlite_autoincrement=True,
)

# A leader's release reads its waiting followers in occurred order: one index range scan,
# whatever the table size. leader_id comes first because every statement of a task's paths
# pins its scope (statements.in_scope), also those that name their rows by id (the
# release's delete, an unclaim, a burial): behind an index that led with scope, a generic
# plan made while the table was small could take that pin as its only index condition and
# read every row of the scope, testing the ids one by one, for as long as the plan is kept.
# A pin on a later column can serve only a scan of the whole index, which PostgreSQL costs
# as such: it takes one only while the index is a page or so.
Index(
    "causal_followers_leader_idx",
    followers.c.leader_id,
    followers.c.scope,
    followers.c.occurred_at,
    followers.c.follower_id,
)


# The two indexes over waiting rows are opt-in. Without statistics (a new table, or a plan
# PostgreSQL made before its first analysis) the planner takes ``claimed_at IS NULL`` for a
# rare condition, so an index of waiting rows only looks a few entries big: a statement
# that names a leader over waiting rows (its count, the depth guard, the sweep's test of
# finished releases) would read the whole index, every waiting row of the table or scope,
# instead of probing the leader index. So each adds a condition true of every row (the
# column is an epoch time, never negative) that only the statements meant to read it
# state; the planner can serve no other statement from it.
def _opted_in(column: Any) -> Any:
    return column >= literal_column("0")


#: Waiting rows by deadline, as the sweep's due range (``statements.DUE``) and ``status``'s
#: count of lost rows ask for them.
WAITING_BY_DEADLINE = and_(followers.c.claimed_at.is_(None), _opted_in(followers.c.deadline))
#: Waiting rows by park time, as ``status`` asks for each scope's oldest.
OLDEST_PARK = and_(followers.c.claimed_at.is_(None), _opted_in(followers.c.parked_at))

# The sweep finds lost followers (waiting, past their deadline): a range probe that reads
# only rows already due, so a sweep with nothing to do reads nothing. The index also
# carries each row's scope, so that ``status`` counts the lost ones per scope from the
# index alone ...
Index(
    "causal_followers_due_idx",
    followers.c.deadline,
    postgresql_include=["scope", "parked_at"],
    postgresql_where=WAITING_BY_DEADLINE,
    sqlite_where=WAITING_BY_DEADLINE,
)
# ... and rows whose releaser died mid-release, without scanning the waiting ones.
Index(
    "causal_followers_claimed_idx",
    followers.c.claimed_at,
    postgresql_where=followers.c.claimed_at.is_not(None),
    sqlite_where=followers.c.claimed_at.is_not(None),
)
# ``status`` finds each scope's oldest waiting park with one probe of this index.
Index(
    "causal_followers_oldest_park_idx",
    followers.c.scope,
    followers.c.parked_at,
    postgresql_where=OLDEST_PARK,
    sqlite_where=OLDEST_PARK,
)
#: Indexes an earlier version created and this one drops (migrate, or a worker's start):
#: the indexes over waiting rows before they were opt-in.
OBSOLETE_INDEXES = {
    "causal_followers": ("causal_followers_deadline_idx", "causal_followers_waiting_idx")
}

#: How many rows ``causal_followers`` holds per scope, summed over ``shard``: kept by
#: triggers on that table in the statements that insert and delete its rows (``counts.py``
#: argues it), so that ``status`` reads a few rows per scope instead of counting them.
scope_counts = Table(
    "causal_scope_counts",
    metadata,
    Column("scope", _Id, nullable=False),
    Column("shard", Integer, nullable=False),
    Column("parked", BigInteger, nullable=False),
    PrimaryKeyConstraint("scope", "shard", name="causal_scope_counts_pkey"),
)

#: Followers whose stored message could not be read back (corrupt, tampered with, or of a
#: content type the app does not accept): moved aside for an operator, never run.
dead_followers = Table(
    "causal_dead_followers",
    metadata,
    Column("id", _RowId, primary_key=True, autoincrement=False),  # the follower row's id
    *_message_columns(),
    Column("died_at", Double, nullable=False),
    Column("reason", String(2000), nullable=False),
)
Index("causal_dead_followers_scope_idx", dead_followers.c.scope)

#: One row per task that succeeded (``done_at``), failed for good (``failed_at``, kept only
#: under the "fail" and "release" policies), or that a follower waits for (``waited_at``,
#: the last park). Shared by every worker; an outcome expires at ``expires_at``, a mark
#: once no follower waits behind it. The row is where a leader and its followers meet:
#: both write it with INSERT ... ON CONFLICT, which the database serialises per key (see
#: ``postgresql.py`` and ``sqlite.py``).
done = Table(
    "causal_done",
    metadata,
    Column("scope", _Id, nullable=False),
    Column("task_id", _Id, nullable=False),
    #: NULL: not succeeded (yet).
    Column("done_at", Double, nullable=True),
    #: NULL: not failed for good (or its failure is not recorded under this policy).
    Column("failed_at", Double, nullable=True),
    #: Until when the outcome answers checks: its record time plus the ``causal_seen_ttl``
    #: of the app that recorded it (apps sharing a store may keep records for different
    #: times). NULL for a mark.
    Column("expires_at", Double, nullable=True),
    #: NULL: no follower ever parked for it, so its outcome has nothing to release.
    Column("waited_at", Double, nullable=True),
    #: Set with an outcome that followers waited for: from then on the sweep takes over
    #: the release of whatever still waits for it (its releaser died after the record).
    Column("release_due_at", Double, nullable=True),
    # Task id first: every probe of a record names its task. Scope first would let a plan
    # made without statistics (a fresh table, or a generic plan kept from a small one) read
    # a whole scope by the key's prefix and test the task id on each row.
    PrimaryKeyConstraint("task_id", "scope", name="causal_done_pkey"),
)
Index(
    "causal_done_expires_idx",
    done.c.expires_at,
    postgresql_where=done.c.expires_at.is_not(None),
    sqlite_where=done.c.expires_at.is_not(None),
)
Index(
    "causal_done_release_due_idx",
    done.c.release_due_at,
    postgresql_where=done.c.release_due_at.is_not(None),
    sqlite_where=done.c.release_due_at.is_not(None),
)
Index(
    "causal_done_waiting_idx",
    done.c.waited_at,
    postgresql_where=and_(done.c.done_at.is_(None), done.c.failed_at.is_(None)),
    sqlite_where=and_(done.c.done_at.is_(None), done.c.failed_at.is_(None)),
)


#: Ordering keys: each key's newest recorded task. A producer sending under a key upserts
#: its row in one statement (``INSERT ... ON CONFLICT DO UPDATE``), which the database
#: serialises per key, so concurrent sends get distinct predecessors and form one chain.
#: The row goes when its newest task finished and nothing was sent after it.
keys = Table(
    "causal_keys",
    metadata,
    Column("scope", _Id, nullable=False),
    Column("key", _Id, nullable=False),
    Column("task_id", _Id, nullable=False),
    #: The task ``task_id`` follows: the key's newest task before it (NULL: the key was free).
    Column("previous", _Id, nullable=True),
    Column("recorded_at", Double, nullable=False),
    PrimaryKeyConstraint("key", "scope", name="causal_keys_pkey"),
)

#: Each send recorded under an ordering key, kept for ``causal_seen_ttl``: a producer that
#: sends the same task id again (an outbox replaying a publish) gets the task it was
#: recorded behind, and does not put the id at the end of its key a second time.
key_sends = Table(
    "causal_key_sends",
    metadata,
    Column("scope", _Id, nullable=False),
    Column("task_id", _Id, nullable=False),
    Column("key", _Id, nullable=False),
    Column("previous", _Id, nullable=True),
    Column("recorded_at", Double, nullable=False),
    PrimaryKeyConstraint("task_id", "scope", name="causal_key_sends_pkey"),
)
Index("causal_key_sends_recorded_idx", key_sends.c.recorded_at)


class db_clock(FunctionElement[float]):
    """The database's clock in epoch seconds, so every worker shares one clock."""

    type = Double()
    inherit_cache = True


@compiles(db_clock, "postgresql")
def _pg_clock(element: db_clock, compiler: Any, **kw: Any) -> str:
    # statement_timestamp() is stable within a statement, so a filter such as
    # ``deadline < clock`` is an index condition; clock_timestamp() (volatile) would make
    # PostgreSQL test it on every row of the index instead.
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_clock, "default")
def _str_clock(element: db_clock, compiler: Any, **kw: Any) -> str:
    # Only for str(statement), in debugging and in SQLAlchemy's own messages.
    return "db_clock()"


@compiles(db_clock, "sqlite")
def _sqlite_clock(element: db_clock, compiler: Any, **kw: Any) -> str:
    # Julian day with millisecond precision, moved to the Unix epoch.
    return "((julianday('now') - 2440587.5) * 86400.0)"


def schema_objects(conn: Any) -> set[str]:
    """The tables, indexes and triggers of the store that exist in the database."""
    inspector = inspect(conn)
    found: set[str] = set()
    for table in metadata.tables.values():
        if inspector.has_table(table.name):
            found.add(f"table {table.name}")
            found.update(f"index {ix['name']}" for ix in inspector.get_indexes(table.name))
    if "table causal_followers" in found:
        found.update(f"trigger {name}" for name in counts.installed(conn, conn.dialect.name))
    return found


def create_missing(conn: Any, present: set[str]) -> list[str]:
    """Create what is not ``present`` (see :func:`schema_objects`): tables, the indexes of
    tables created by an earlier version, the count triggers; drop the obsolete indexes
    ``present``. Return those dropped."""
    metadata.create_all(conn, checkfirst=True)
    if "table causal_followers" in present and conn.dialect.name == "postgresql":
        _lock_followers_for(conn, present)
    dropped: list[str] = []
    for table in metadata.sorted_tables:
        if f"table {table.name}" not in present:
            continue  # created just now, with its indexes
        for name in OBSOLETE_INDEXES.get(table.name, ()):
            if f"index {name}" in present:
                conn.execute(DropIndex(Index(name), if_exists=True))
                dropped.append(f"index {name}")
        for index in table.indexes:
            if f"index {index.name}" not in present:
                # IF NOT EXISTS: SQLite processes starting at once take no common lock
                conn.execute(CreateIndex(index, if_not_exists=True))
    counts.install(conn, conn.dialect.name)
    return dropped


def _lock_followers_for(conn: Any, present: set[str]) -> None:
    """Lock ``causal_followers`` at once as strongly as the changes due to it need.

    One transaction creates the schema (``PostgresStore._schema_lock``). Taken step by
    step, its locks on the table would grow (SHARE to build an index, SHARE ROW EXCLUSIVE
    to install the triggers, ACCESS EXCLUSIVE to drop an index) while a finishing task's
    record-and-claim holds ROW SHARE (its FOR UPDATE) and waits for ROW EXCLUSIVE (its
    UPDATE): each would wait for the other. Taken first, the strongest lock only waits for
    the statements in flight to end, and every later step holds what it needs.
    """
    table = followers.name
    drop = any(f"index {name}" in present for name in OBSOLETE_INDEXES.get(table, ()))
    build = any(f"index {index.name}" not in present for index in followers.indexes)
    install = any(f"trigger {name}" not in present for name in counts.TRIGGERS["postgresql"])
    mode = "ACCESS EXCLUSIVE" if drop else "SHARE ROW EXCLUSIVE" if build or install else None
    if mode is not None:
        conn.exec_driver_sql(f"LOCK TABLE {counts.followers_schema(conn)}.{table} IN {mode} MODE")
