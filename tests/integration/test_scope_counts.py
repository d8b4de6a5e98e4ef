"""``status`` reads per-scope counts that triggers keep (``celery_causal/sql/counts.py``):
whatever inserts or deletes follower rows, the counts match the rows."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from celery_causal.sql import SQLStore, counts, open_store
from tests.conftest import fresh_database
from tests.helpers import age, driver_connection, follower, truncate

LOOKBACK = 600.0


def truth(store: SQLStore) -> dict[str, tuple[int, int]]:
    """(waiting, releasing) per scope, counted from the rows themselves."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT scope, sum(CASE WHEN claimed_at IS NULL THEN 1 ELSE 0 END), "
                "sum(CASE WHEN claimed_at IS NULL THEN 0 ELSE 1 END) "
                "FROM causal_followers GROUP BY scope"
            )
        ).all()
    return {scope: (int(waiting), int(releasing)) for scope, waiting, releasing in rows}


def reported(store: SQLStore) -> dict[str, tuple[int, int]]:
    return {s.scope: (s.waiting, s.releasing) for s in store.stats() if s.waiting + s.releasing}


def oldest(store: SQLStore) -> dict[str, float | None]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT scope, min(parked_at) FROM causal_followers "
                "WHERE claimed_at IS NULL GROUP BY scope"
            )
        ).all()
    return {scope: parked_at for scope, parked_at in rows}


SCOPES = ["default", "billing", "mail"]


def _park(store: SQLStore, rng: random.Random, step: int, parked: list[tuple[str, str]]) -> None:
    scope, leader, follower_id = rng.choice(SCOPES), f"L{rng.randrange(8)}", f"f{step}"
    store.park(follower(follower_id, leader, scope=scope), LOOKBACK)
    # A redelivered copy parks again without a second row
    store.park(follower(follower_id, leader, scope=scope), LOOKBACK)
    parked.append((scope, follower_id))


def _release(store: SQLStore, scope: str, follower_id: str) -> None:
    claimed = store.claim_one(scope, follower_id)
    if claimed is not None:
        store.finish([claimed])


def _unclaim(store: SQLStore, scope: str, follower_id: str) -> None:
    claimed = store.claim_one(scope, follower_id)
    if claimed is not None:
        store.unclaim([claimed])


def _bury(store: SQLStore, scope: str, follower_id: str) -> None:
    claimed = store.claim_one(scope, follower_id)
    if claimed is not None:
        store.bury(claimed, "unreadable")


def _operator_delete(store: SQLStore, scope: str, follower_id: str) -> None:
    # An operator's own SQL: every scope's rows of that task id, in one statement
    with store.engine.connect() as conn:
        conn.execute(
            text("DELETE FROM causal_followers WHERE follower_id = :f"), {"f": follower_id}
        )


#: What may happen to a parked row, each with (store, scope, follower id).
ON_A_ROW: dict[str, Any] = {
    "release": _release,
    "claim": lambda store, scope, f: store.claim_one(scope, f),  # not deleted yet
    "unclaim": _unclaim,
    "bury": _bury,
    "forget": lambda store, scope, f: store.forget(scope, f),
    "operator": _operator_delete,
}


def test_status_matches_the_rows_through_every_way_rows_come_and_go(sql_store: SQLStore) -> None:
    rng = random.Random(7)
    parked: list[tuple[str, str]] = []
    for step in range(300):
        action = rng.choice(["park", "park", "park", *ON_A_ROW])
        if action == "park" or not parked:
            _park(sql_store, rng, step, parked)
        else:
            ON_A_ROW[action](sql_store, *rng.choice(parked))
        if step % 25 == 0:
            assert reported(sql_store) == truth(sql_store), f"after step {step} ({action})"
    assert reported(sql_store) == truth(sql_store)
    assert {s.scope: s.oldest_parked_at for s in sql_store.stats() if s.waiting} == oldest(
        sql_store
    )
    # A leader's release of what waits for it, and the sweep's of the lost rest
    for leader in range(8):
        for scope in SCOPES:
            record = sql_store.record_done_and_claim(scope, f"L{leader}", 1000)
            sql_store.finish(record.claimed)
    assert reported(sql_store) == truth(sql_store)
    age(sql_store, 2 * LOOKBACK)
    sql_store.finish(sql_store.claim_lost(60.0, 10_000))
    sql_store.finish(sql_store.claim_lost(60.0, 10_000))  # stuck claims from the "claim" steps
    assert reported(sql_store) == truth(sql_store) == {}
    # The sweep's last step leaves no count of an empty scope behind (on PostgreSQL they
    # were spread over the shards of the connections the rows came and went through)
    sql_store.park(follower("last", "L-last", scope="mail"), LOOKBACK)
    sql_store.expire_done(3600.0, 1000)
    assert counts_rows(sql_store) == [("mail", 1)]
    assert reported(sql_store) == truth(sql_store) == {"mail": (1, 0)}


def counts_rows(store: SQLStore) -> list[tuple[str, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT scope, parked FROM causal_scope_counts ORDER BY scope"))
        return [(scope, int(parked)) for scope, parked in rows]


def test_a_truncate_of_the_followers_clears_their_counts(pg_url: str) -> None:
    store = open_store(pg_url)
    truncate(store)
    try:
        store.park(follower("f1", "L"), LOOKBACK)
        with store.engine.connect() as conn:
            conn.execute(text("TRUNCATE causal_followers"))
        assert reported(store) == {}
        store.park(follower("f2", "L"), LOOKBACK)
        assert reported(store) == {"default": (1, 0)} == truth(store)
    finally:
        truncate(store)
        store.close()


def _park_and_release(store: SQLStore, worker: int) -> None:
    for n in range(60):
        scope = ("default", "billing")[n % 2]
        store.park(follower(f"w{worker}-{n}", f"L{worker}-{n}", scope=scope), LOOKBACK)
        if n % 3 == 2:
            # The leader of the follower parked two steps ago, in the same scope
            record = store.record_done_and_claim(scope, f"L{worker}-{n - 2}", 100)
            assert len(record.claimed) == 1
            store.finish(record.claimed)


def _sweep_until(store: SQLStore, done: threading.Event) -> None:
    while not done.is_set():
        store.expire_done(3600.0, 1000)  # its last step tidies the counts


def _recording(errors: list[BaseException], work: Any, *args: Any) -> threading.Thread:
    def run() -> None:
        try:
            work(*args)
        except BaseException as exc:
            errors.append(exc)

    return threading.Thread(target=run)


def test_concurrent_parks_releases_and_sweeps_keep_exact_counts(pg_url: str) -> None:
    # Eight threads, each its own pooled connection (and so, mostly, its own shard), park
    # and release in two scopes at once; some share a shard and queue on its row. Two
    # sweeps (two beat schedulers by mistake, or one from the CLI) tidy the counts
    # meanwhile; a deadlock would show as an error here.
    store = open_store(pg_url)
    truncate(store)
    errors: list[BaseException] = []
    done = threading.Event()
    workers = [_recording(errors, _park_and_release, store, w) for w in range(8)]
    sweepers = [_recording(errors, _sweep_until, store, done) for _ in range(2)]
    try:
        for thread in sweepers + workers:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        for thread in sweepers:
            thread.join()
        assert errors == []
        assert reported(store) == truth(store)
        store.expire_done(3600.0, 1000)
        assert counts_rows(store) == sorted((s, w + r) for s, (w, r) in truth(store).items())
        assert sum(w for w, _ in truth(store).values()) > 0
    finally:
        truncate(store)
        store.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_store_created_before_the_counts_gets_them_with_its_rows_counted(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'old.sqlite3'}"
        if dialect == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    store = open_store(url)
    truncate(store)
    try:
        store.park(follower("f1", "L"), LOOKBACK)
        store.park(follower("f2", "L", scope="billing"), LOOKBACK)
        store.claim_one("billing", "f2")
        # Given a schema without the counts, their triggers and the oldest-park index, with
        # the index an earlier version had in its place
        with store.engine.connect() as conn:
            as_before_the_counts(conn, dialect)
            if getattr(conn, "in_transaction", lambda: False)():
                conn.commit()
        # When it is migrated
        created = store.create_schema()
        # Then what was missing is created, and the rows already there are counted
        assert "created table causal_scope_counts" in created
        assert "created index causal_followers_oldest_park_idx" in created
        assert "created index causal_followers_due_idx" in created
        assert "dropped index causal_followers_waiting_idx (obsolete)" in created
        assert "dropped index causal_followers_deadline_idx (obsolete)" in created
        assert "created trigger causal_followers_count_inserts" in created
        assert "created trigger causal_followers_count_deletes" in created
        assert reported(store) == {"default": (1, 0), "billing": (0, 1)} == truth(store)
        assert store.create_schema() == []
        store.park(follower("f3", "L"), LOOKBACK)
        assert reported(store) == {"default": (2, 0), "billing": (0, 1)}
    finally:
        truncate(store)
        store.close()


def test_a_migration_waits_for_a_finishing_task_instead_of_deadlocking_with_it(
    pg_url: str, pg_store: SQLStore
) -> None:
    migrated: list[Any] = []
    for n in range(3):
        pg_store.park(follower(f"f{n}", "L"), LOOKBACK)
    with pg_store.engine.connect() as conn:
        as_before_the_counts(conn, "postgresql")
        conn.commit()
    with driver_connection(pg_url) as task, driver_connection(pg_url) as watcher:
        # Given a task finishing: its record-and-claim has selected its followers FOR
        # UPDATE (a ROW SHARE lock on the table) and is about to update them
        task.execute("SELECT id FROM causal_followers WHERE leader_id = 'L' FOR UPDATE")
        # When a migration of the store starts meanwhile
        migration = threading.Thread(target=lambda: migrated.append(_migrate_or_error(pg_url)))
        migration.start()
        while not watcher.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted "
            "AND relation = 'causal_followers'::regclass"
        ).fetchone()[0]:  # type: ignore[index]
            assert migration.is_alive(), migrated
            time.sleep(0.01)
        # Then the task's update goes through, and the migration once it committed
        task.execute("UPDATE causal_followers SET claimed_at = 1 WHERE leader_id = 'L'")
        task.commit()
        migration.join(30)
    assert len(migrated) == 1 and isinstance(migrated[0], list), migrated
    assert "dropped index causal_followers_deadline_idx (obsolete)" in migrated[0]
    assert "created trigger causal_followers_count_inserts" in migrated[0]
    assert reported(pg_store) == {"default": (0, 3)} == truth(pg_store)


def test_a_store_in_public_migrates_when_a_schema_named_after_its_role_appears() -> None:
    # Given a store with an index of an earlier version, made before its role got a schema
    # of its own name: the tables stay in public, where the default search_path ("$user",
    # public) still finds them, while current_schema() is now the new, empty schema
    with fresh_database("_own_schema") as url:
        store = open_store(url)
        try:
            store.park(follower("f1", "L"), LOOKBACK)
            with store.engine.connect() as conn:
                conn.exec_driver_sql("DROP INDEX causal_followers_due_idx")
                conn.exec_driver_sql(
                    "CREATE INDEX causal_followers_deadline_idx ON causal_followers (deadline) "
                    "WHERE claimed_at IS NULL"
                )
                role = conn.exec_driver_sql("SELECT current_user").scalar_one()
                conn.exec_driver_sql(f'CREATE SCHEMA "{role}"')
                conn.commit()
        finally:
            store.close()
        # When it is migrated, then its index is replaced in public
        done = _migrate(url)
        assert done == [
            "created index causal_followers_due_idx",
            "dropped index causal_followers_deadline_idx (obsolete)",
        ]
        store = open_store(url, create_schema=False)
        try:
            assert reported(store) == {"default": (1, 0)} == truth(store)
            with store.engine.connect() as conn:
                where = conn.exec_driver_sql(
                    "SELECT relnamespace::regnamespace::text FROM pg_class "
                    "WHERE relname = 'causal_followers_due_idx'"
                ).all()
            assert where == [("public",)]
        finally:
            store.close()


def _migrate_or_error(url: str) -> list[str] | BaseException:
    try:
        return _migrate(url)
    except BaseException as exc:
        return exc


def test_a_truncate_while_a_tidy_up_waits_leaves_no_count_behind(pg_url: str) -> None:
    store = open_store(pg_url)
    truncate(store)
    tidied: list[BaseException | None] = []
    try:
        # Given counts in two scopes, spread over two connections' shards
        store.park(follower("b1", "L2", scope="b"), LOOKBACK)
        store.expire_done(3600.0, 1000)
        with store.engine.connect() as first, store.engine.connect() as second:
            for conn, scope, ids in ((first, "a", ("a1", "a2")), (second, "b", ("b2",))):
                for follower_id in ids:
                    conn.execute(
                        text(
                            "INSERT INTO causal_followers (scope, follower_id, leader_id, "
                            "task_name, occurred_at, parked_at, content_type, "
                            "content_encoding, payload, hostname, lookback, deadline) VALUES "
                            "(:s, :f, 'L', 't', 1, 1, 'application/json', 'utf-8', '', 'h', "
                            "600, 1e12)"
                        ),
                        {"s": scope, "f": follower_id},
                    )
        # And another session holding one of scope b's counts for a moment
        with driver_connection(pg_url) as holder:
            holder.execute("SELECT 1 FROM causal_scope_counts WHERE scope = 'b' FOR UPDATE")
            # When a sweep's tidy-up waits for it, and an operator truncates the followers
            sweep = threading.Thread(target=lambda: tidied.append(tidy(store)))
            sweep.start()
            sweep.join(0.5)
            with driver_connection(pg_url, autocommit=True) as operator:
                truncating = threading.Thread(
                    target=lambda: operator.execute("TRUNCATE causal_followers")
                )
                truncating.start()
                truncating.join(0.5)
                holder.commit()
                sweep.join(30)
                truncating.join(30)
        # Then both finish, and no count outlives the rows
        assert tidied == [None]
        assert counts_rows(store) == []
        assert reported(store) == {}
    finally:
        truncate(store)
        store.close()


def tidy(store: SQLStore) -> BaseException | None:
    try:
        store.expire_done(3600.0, 1000)
    except BaseException as exc:
        return exc
    return None


def test_a_parked_row_keeps_its_scope(sql_store: SQLStore) -> None:
    sql_store.park(follower("f1", "L"), LOOKBACK)
    with pytest.raises(DBAPIError, match="keeps its scope"), sql_store.engine.connect() as conn:
        conn.execute(text("UPDATE causal_followers SET scope = 'elsewhere'"))
    assert reported(sql_store) == truth(sql_store) == {"default": (1, 0)}


def as_before_the_counts(conn: Any, dialect: str) -> None:
    """The schema as an earlier version left it: no counts, no triggers, and the indexes
    over waiting rows as they were before they were opt-in."""
    on = " ON causal_followers" if dialect == "postgresql" else ""
    for name in counts.TRIGGERS[dialect]:
        conn.execute(text(f"DROP TRIGGER IF EXISTS {name}{on}"))
    conn.execute(text("DROP TABLE causal_scope_counts"))
    for name in ("oldest_park", "due", "waiting", "deadline"):
        conn.execute(text(f"DROP INDEX IF EXISTS causal_followers_{name}_idx"))
    for old in (
        "causal_followers_waiting_idx ON causal_followers (scope, parked_at)",
        "causal_followers_deadline_idx ON causal_followers (deadline)",
    ):
        conn.execute(text(f"CREATE INDEX {old} WHERE claimed_at IS NULL"))


def _migrate(url: str) -> list[str]:
    store = open_store(url, create_schema=False)
    try:
        return store.create_schema()
    finally:
        store.close()


def test_processes_migrating_an_old_sqlite_store_at_once_each_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    store = open_store(url)
    try:
        for n in range(20):
            store.park(follower(f"f{n}", "L", scope=("a", "b")[n % 2]), LOOKBACK)
        with store.engine.connect() as conn:
            as_before_the_counts(conn, "sqlite")
    finally:
        store.close()
    # Several workers start at once on it: SQLite takes no lock of its own for DDL
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        created = pool.map(_migrate, [url] * 4)
    # One of them creates the table, its triggers and two indexes, and drops the old two
    assert sorted(len(c) for c in created) == [0, 0, 0, 8]
    store = open_store(url)
    try:
        assert reported(store) == truth(store) == {"a": (10, 0), "b": (10, 0)}
    finally:
        store.close()
