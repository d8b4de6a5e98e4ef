"""Which statements PostgreSQL keeps a prepared plan of (psycopg prepares a statement
after its fifth run on a connection)."""

from __future__ import annotations

from sqlalchemy import text

from celery_causal.sql import open_store
from tests.helpers import follower, truncate


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
