"""Which statements PostgreSQL keeps a prepared plan of (psycopg prepares a statement
after its fifth run on a connection)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import asyncpg

from celery_causal.sql import SQLStore, open_store
from celery_causal.sql import housekeeping as hk
from celery_causal.sql import statements as sql
from celery_causal.sql.postgresql import PostgresStore
from tests.helpers import driver_connection, follower, truncate


def test_the_release_delete_is_planned_on_every_call_and_the_claim_is_prepared(
    pg_url: str,
) -> None:
    store = open_store(pg_url)
    truncate(store)
    try:
        for n in range(8):
            store.park(follower(f"f{n}", f"L{n}"), 60.0)
            store.finish(store.claim_followers("default", f"L{n}", 10))
        # One task at a time on one thread: every call above ran on one pooled connection
        with store._db.engine.connect() as conn:
            prepared = list(conn.execute(text("SELECT statement FROM pg_prepared_statements")))
        statements = [row[0] for row in prepared]
        # The park and the claim ran as often as the delete, and are prepared
        assert any("INSERT INTO causal_followers" in s for s in statements)
        assert any(s.startswith("WITH claimable") for s in statements)
        assert not [s for s in statements if "DELETE FROM causal_followers" in s]
        assert sum(x.waiting for x in store.stats()) == 0
    finally:
        truncate(store)
        store.close()


def test_no_statement_of_a_task_is_parsed_again_on_each_call(pg_url: str, monkeypatch: Any) -> None:
    # psycopg converts the %(name)s placeholders of a query on every execute, and caches
    # the conversion only for queries up to 4 kB: longer ones (the record-and-claim) would
    # be parsed again on each call. The store sends them in PostgreSQL's own syntax.
    conversions: list[bytes] = []
    uncached = psycopg._queries._query2pg_nocache

    def counting(query: bytes, *args: Any) -> Any:
        conversions.append(query)
        return uncached(query, *args)

    monkeypatch.setattr(psycopg._queries, "_query2pg_nocache", counting)
    store = open_store(pg_url)
    truncate(store)
    try:
        for n in range(3):
            assert store.lookup("default", [f"L{n}", f"f{n}"]).done == frozenset()
            store.park(follower(f"f{n}", f"L{n}"), 60.0)
            record = store.record_done_and_claim("default", f"L{n}", 10)
            assert [c.follower_id for c in record.claimed] == [f"f{n}"]
            store.finish(record.claimed)
            store.record_done_and_claim("default", f"f{n}", 10)
        assert store.claim_lost(60.0, 10) == []
        assert sum(x.waiting for x in store.stats()) == 0
        assert [q[:60] for q in conversions] == []
    finally:
        truncate(store)
        store.close()


def _rows_read(node: dict[str, Any]) -> float:
    """Rows of causal_followers a plan node (and its children) read or threw away."""
    loops = node.get("Actual Loops", 1)
    read = 0.0
    if node.get("Relation Name") == "causal_followers":
        read += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    read += node.get("Rows Removed by Join Filter", 0) * loops
    return read + sum(_rows_read(child) for child in node.get("Plans", ()))


class GenericPlan:
    """A store statement prepared on a bare connection under the plan a connection may keep
    for it: by default one made without its values (PostgreSQL's generic plan), here forced
    for the session (``mode``: the ``plan_cache_mode``)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        statement: Any,
        mode: str = "force_generic_plan",
        **values: Any,
    ) -> None:
        compiled = statement.compile(dialect=asyncpg.dialect())
        params = {**compiled.params, **values}
        self.values = [params[name] for name in compiled.positiontup]
        self.cursor = psycopg.ClientCursor(conn)
        self.cursor.execute(f"SET plan_cache_mode = {mode}")
        self.cursor.execute(f"PREPARE s AS {compiled}")

    def rows_read(self) -> tuple[float, Any]:
        """Run it once; the follower rows its plan read, and the plan."""
        placeholders = ", ".join(["%s"] * len(self.values))
        self.cursor.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE s({placeholders})", self.values
        )
        ((plan,),) = self.cursor.fetchall()
        return _rows_read(plan[0]["Plan"]), plan


def test_a_leader_claim_reads_about_its_batch_even_under_a_generic_plan(pg_url: str) -> None:
    # Given a leader with 1,500 parked followers, on a table with no statistics
    store = open_store(pg_url)
    truncate(store)
    try:
        for n in range(1500):
            store.park(follower(f"f{n}", "big", occurred_at=float(n)), 600.0)
        with driver_connection(pg_url) as conn:
            claim = GenericPlan(
                conn,
                PostgresStore.claim_followers_sql,
                b_scope="default",
                b_leader="big",
                b_limit=100,
            )
            # When three batches of 100 are claimed, each reads about its own rows, not
            # the leader's 1,500 followers, nor those times the batch
            for batch in range(3):
                read, plan = claim.rows_read()
                assert read <= 3 * 100, f"batch {batch} read {read:.0f} rows: {plan}"
                # As the release does once it published them
                conn.execute("DELETE FROM causal_followers WHERE claimed_at IS NOT NULL")
            conn.rollback()
    finally:
        truncate(store)
        store.close()


#: ``n`` followers over 60 leaders in ``scope``, as workers park them (without the marks).
_PARK_MANY = text(
    "INSERT INTO causal_followers (scope, follower_id, leader_id, task_name, occurred_at, "
    "parked_at, lookback, deadline, content_type, content_encoding, payload, hostname) "
    "SELECT CAST(:scope AS text), :scope || '-f' || g, 'L' || (g % 60), 'tests.step', g, "
    "extract(epoch from now()), 600, extract(epoch from now()) + 600, 'application/json', "
    "'utf-8', '', 'h' FROM generate_series(1, :n) g"
)
#: Statements over one leader's waiting rows (leader L7, scope default).
_ONE_LEADERS = {
    "a leader's count": hk.COUNT_WAITING,
    "the depth guard": sql.MAKE_DUE,
    "a forget's restored deadlines": hk.UNPOSTPONE,
    "the sweep's test of finished releases": hk.CLEAR_RELEASES,
}


@pytest.mark.parametrize("other_scope", [False, True], ids=["one scope", "two scopes"])
def test_a_statement_on_one_leaders_waiting_rows_reads_only_those(
    pg_url: str, pg_store: SQLStore, other_scope: bool
) -> None:
    # Given 3,000 followers waiting in scope "default", 50 for each of 60 leaders (and as
    # many in a second scope, a tenth of them being released), 3,000 tasks done and three
    # leaders whose release is over, on tables with no statistics
    for n in range(3000):
        pg_store.park(follower(f"f{n}", f"L{n % 60}"), 600.0)
        pg_store.record_done_and_claim("default", f"t{n}", 10)
    with pg_store.engine.begin() as conn:
        if other_scope:
            conn.execute(_PARK_MANY, {"scope": "other", "n": 3000})
            conn.execute(
                text(
                    "UPDATE causal_followers SET claimed_at = 1 "
                    "WHERE scope = 'other' AND id % 10 = 0"
                )
            )
    for n in range(3):
        pg_store.park(follower(f"r{n}", f"R{n}"), 600.0)
        record = pg_store.record_done_and_claim("default", f"R{n}", 10, release_timeout=-1.0)
        pg_store.finish(record.claimed)
    # When each statement runs for leader L7, under the plan a connection may keep for
    # it (made without its values) and under one made with them
    reads = {}
    for name, statement in _ONE_LEADERS.items():
        for mode in ("force_generic_plan", "force_custom_plan"):
            with driver_connection(pg_url) as conn:
                plan = GenericPlan(
                    conn, statement, mode=mode, b_scope="default", b_leader="L7", b_limit=10
                )
                reads[name, mode] = plan.rows_read()[0]
                conn.rollback()
    # Then each reads that leader's 50 rows at most, not the scope's or the table's
    assert {key: read for key, read in reads.items() if read > 50} == {}


def test_status_reads_no_waiting_row_only_each_scopes_oldest(pg_url: str) -> None:
    # Given 2,000 followers waiting in one scope and 3 being released in another
    store = open_store(pg_url)
    truncate(store)
    try:
        for n in range(2000):
            store.park(follower(f"f{n}", f"L{n % 50}"), 600.0)
        for n in range(3):
            store.park(follower(f"b{n}", "M", scope="billing"), 600.0)
        store.claim_followers("billing", "M", 10)
        statement = hk.STATS.params(b_timeout=60.0).compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
        with store.engine.connect() as conn:
            # As autovacuum would have by now (this server runs without it)
            conn.exec_driver_sql("ANALYZE causal_followers")
            ((plan,),) = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}".replace("%", "%%")
            ).all()
        # When status runs, it reads the claimed rows and one entry per scope, not the
        # waiting rows (they are counted by their scope's counts)
        read = _rows_read(plan[0]["Plan"])
        assert read <= 3 + 2, f"status read {read:.0f} rows: {plan}"
        stats = {s.scope: (s.waiting, s.releasing) for s in store.stats()}
        assert stats == {"default": (2000, 0), "billing": (0, 3)}
    finally:
        truncate(store)
        store.close()
