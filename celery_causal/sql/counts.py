"""Per-scope counts of the follower table, kept by triggers, so ``status`` counts no rows.

``causal_scope_counts`` holds, per scope, how many rows ``causal_followers`` has (waiting
and being released), split over a few rows per scope (``shard``). Its invariant: the sum
of a scope's ``parked`` equals the scope's rows in ``causal_followers``, in every snapshot.
It holds because the database adjusts the counts inside the statement that inserts or
deletes the rows, whoever sends it (the store, an operator's ``DELETE``), so the count
commits or rolls back with them; a TRUNCATE of the follower table clears them. Updates
(a claim, an unclaim) move no row in or out and leave the counts alone; one that would
move a row to another scope is refused (the store never makes one).

PostgreSQL: statement-level triggers with transition tables, so a release that deletes
500 rows updates one count, not 500. Each server connection adds to the shard of its
backend pid: parks from many connections do not queue behind one row's lock (a pool's
connections start close together, so their pids fall in distinct shards). Two writers that
share a shard wait for each other's commit. Each statement locks its counts in scope
order, and so does the sweep's tidy-up, which folds each scope's counts into one row and
drops those at zero (``postgresql.TIDY_COUNTS``); every statement of the store commits
alone. So no two of them can deadlock, also with two sweeps at once. (An operator's
transaction that changes several scopes' rows in separate statements, out of scope order,
can: PostgreSQL then aborts one side, which rolls back whole, so nothing is miscounted.)
SQLite: row-level triggers (one writer at a time; one shard).
"""

from __future__ import annotations

from typing import Any

from .engine import POSTGRESQL

#: Rows per scope in ``causal_scope_counts`` that PostgreSQL's connections spread over.
SHARDS = 64

#: The triggers that keep the counts, by dialect.
TRIGGERS = {
    POSTGRESQL: (
        "causal_followers_count_inserts",
        "causal_followers_count_deletes",
        "causal_followers_count_truncates",
        "causal_followers_keep_scope",
    ),
    "sqlite": (
        "causal_followers_count_inserts",
        "causal_followers_count_deletes",
        "causal_followers_keep_scope",
    ),
}

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.causal_count_followers() RETURNS trigger
LANGUAGE plpgsql AS $causal$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {schema}.causal_scope_counts AS c (scope, shard, parked)
        SELECT scope, mod(pg_backend_pid(), {shards}), count(*)
        FROM causal_inserted_rows GROUP BY scope ORDER BY scope
        ON CONFLICT (scope, shard) DO UPDATE SET parked = c.parked + excluded.parked;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.causal_scope_counts AS c (scope, shard, parked)
        SELECT scope, mod(pg_backend_pid(), {shards}), -count(*)
        FROM causal_deleted_rows GROUP BY scope ORDER BY scope
        ON CONFLICT (scope, shard) DO UPDATE SET parked = c.parked + excluded.parked;
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.scope IS DISTINCT FROM OLD.scope THEN
            RAISE EXCEPTION 'causal_followers: a parked follower keeps its scope';
        END IF;
        RETURN NEW;
    ELSE
        -- After any tidy-up in flight: one waits for the lock, so this DELETE's snapshot
        -- holds the shard row the tidy-up wrote, which would otherwise outlive the rows.
        LOCK TABLE {schema}.causal_scope_counts IN EXCLUSIVE MODE;
        DELETE FROM {schema}.causal_scope_counts;
    END IF;
    RETURN NULL;
END
$causal$
"""

_PG_TRIGGERS = (
    "CREATE TRIGGER causal_followers_count_inserts AFTER INSERT ON {schema}.causal_followers "
    "REFERENCING NEW TABLE AS causal_inserted_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION {schema}.causal_count_followers()",
    "CREATE TRIGGER causal_followers_count_deletes AFTER DELETE ON {schema}.causal_followers "
    "REFERENCING OLD TABLE AS causal_deleted_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION {schema}.causal_count_followers()",
    "CREATE TRIGGER causal_followers_count_truncates AFTER TRUNCATE "
    "ON {schema}.causal_followers "
    "FOR EACH STATEMENT EXECUTE FUNCTION {schema}.causal_count_followers()",
    "CREATE TRIGGER causal_followers_keep_scope BEFORE UPDATE OF scope "
    "ON {schema}.causal_followers "
    "FOR EACH ROW EXECUTE FUNCTION {schema}.causal_count_followers()",
)

_SQLITE_TRIGGERS = (
    "CREATE TRIGGER causal_followers_count_inserts AFTER INSERT ON causal_followers BEGIN "
    "INSERT INTO causal_scope_counts (scope, shard, parked) VALUES (NEW.scope, 0, 1) "
    "ON CONFLICT (scope, shard) DO UPDATE SET parked = parked + 1; END",
    "CREATE TRIGGER causal_followers_count_deletes AFTER DELETE ON causal_followers BEGIN "
    "INSERT INTO causal_scope_counts (scope, shard, parked) VALUES (OLD.scope, 0, -1) "
    "ON CONFLICT (scope, shard) DO UPDATE SET parked = parked - 1; END",
    "CREATE TRIGGER causal_followers_keep_scope BEFORE UPDATE OF scope ON causal_followers "
    "WHEN NEW.scope IS NOT OLD.scope BEGIN "
    "SELECT RAISE(ABORT, 'causal_followers: a parked follower keeps its scope'); END",
)

#: The counts of the rows already there when the triggers are created.
_RECOUNT = (
    "DELETE FROM {schema}causal_scope_counts",
    "INSERT INTO {schema}causal_scope_counts (scope, shard, parked) "
    "SELECT scope, 0, count(*) FROM {schema}causal_followers GROUP BY scope",
)


def installed(conn: Any, dialect: str) -> set[str]:
    """The names of the counting triggers that exist on the follower table."""
    if dialect == POSTGRESQL:
        rows = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
            "AND tgrelid = to_regclass('causal_followers')"
        )
    else:
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' "
            "AND tbl_name = 'causal_followers'"
        )
    return {name for (name,) in rows} & set(TRIGGERS[dialect])


def install(conn: Any, dialect: str) -> None:
    """Create the triggers where any is missing, and count the rows already there.

    Called inside the schema's creation, which holds a transaction (on SQLite, one that
    took the write lock first), so the recount and the triggers are one step: no row can be
    inserted or deleted between the count of the rows present and the first trigger.
    """
    if dialect == POSTGRESQL:
        _install_postgresql(conn)
    elif len(installed(conn, dialect)) < len(TRIGGERS[dialect]):
        _replace(conn, _SQLITE_TRIGGERS, on="", schema="")


def followers_schema(conn: Any) -> str:
    """The schema (quoted as needed) of the ``causal_followers`` this connection's
    search_path finds: the one the inspector, CREATE INDEX and DROP INDEX find too, which
    need not be ``current_schema()`` (tables made in ``public`` before a schema named after
    the role was created)."""
    return str(
        conn.exec_driver_sql(
            "SELECT relnamespace::regnamespace::text FROM pg_class "
            "WHERE oid = to_regclass('causal_followers')"
        ).scalar_one()
    )


def _install_postgresql(conn: Any) -> None:
    if len(installed(conn, POSTGRESQL)) == len(TRIGGERS[POSTGRESQL]):
        return
    schema = followers_schema(conn)
    # Writers wait from here to the commit; readers (status, lookups) go on.
    conn.exec_driver_sql(f"LOCK TABLE {schema}.causal_followers IN SHARE ROW EXCLUSIVE MODE")
    conn.exec_driver_sql(_PG_FUNCTION.format(schema=schema, shards=SHARDS))
    triggers = [ddl.format(schema=schema) for ddl in _PG_TRIGGERS]
    _replace(conn, triggers, on=f" ON {schema}.causal_followers", schema=f"{schema}.")


def _replace(conn: Any, triggers: Any, *, on: str, schema: str) -> None:
    """Drop what is left of the triggers, create them all, and recount the rows."""
    for name in TRIGGERS[conn.dialect.name]:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}{on}")
    for ddl in triggers:
        conn.exec_driver_sql(ddl)
    for statement in _RECOUNT:
        conn.exec_driver_sql(statement.format(schema=schema))
