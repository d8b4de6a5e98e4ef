"""Housekeeping against writers, forced through PostgreSQL's row locks.

The sweep deletes done records and marks older than the seen TTL while leaders record
done and followers park on the same rows. One side's transaction is held open on the row
while the other runs; the row written by the open side must survive the expiry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celery_causal.sql import SQLStore
from celery_causal.sql.postgresql import PARK
from tests.helpers import age, driver_connection, follower

TTL = 1800.0
LOOKBACK = 900.0


def _expired_mark_without_followers(pg_store: SQLStore, leader: str) -> None:
    """A mark of ``leader`` older than the TTL whose follower is gone (released, forgotten)."""
    pg_store.park(follower("gone", leader), LOOKBACK)
    assert pg_store.forget("default", "gone")
    age(pg_store, 2 * TTL)


def _expire_while_held(
    pg_store: SQLStore, pg_url: str, statement: Any, values: dict[str, Any]
) -> int:
    """Run ``statement`` in a transaction held open while the sweep expires records.

    Returns how many records the sweep expired. The sweep either waits for the held row's
    lock or passes it by; either way the held transaction commits before it is judged.
    """
    compiled = pg_store._db.compile(statement)
    held = driver_connection(pg_url)
    expired: list[int] = []
    try:
        compiled.execute(held, values)
        pid = held.info.backend_pid
        sweep = threading.Thread(target=lambda: expired.append(pg_store.expire_done(TTL, 100)))
        sweep.start()
        blocked = (
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND %s = ANY(pg_blocking_pids(pid))"
        )
        with driver_connection(pg_url) as probe:
            for _ in range(300):
                row = probe.execute(blocked, (pid,)).fetchone()
                if not sweep.is_alive() or (row is not None and row[0]):
                    break
                time.sleep(0.01)
        held.commit()
        sweep.join(20)
        assert not sweep.is_alive()
    finally:
        held.close()
    return expired[0]


@pytest.mark.timeout(60)
def test_a_done_record_made_while_the_sweep_expires_its_old_mark_survives(
    pg_store: SQLStore, pg_url: str
) -> None:
    # Given L's mark, expired and without followers
    _expired_mark_without_followers(pg_store, "L")
    # When L records done (transaction open on L's row) while the sweep expires records
    _expire_while_held(
        pg_store,
        pg_url,
        pg_store.record_sql,
        {
            "b_scope": "default",
            "b_task_id": "L",
            "b_failed": False,
            "b_ttl": TTL,
            "b_timeout": 60.0,
        },
    )
    # Then L's fresh done record is there: a later follower runs, a duplicate is skipped
    assert pg_store.lookup("default", ["L"]).done == {"L"}


@pytest.mark.timeout(60)
def test_a_park_made_while_the_sweep_expires_the_leaders_old_mark_is_released(
    pg_store: SQLStore, pg_url: str
) -> None:
    # Given L's mark, expired and without followers
    _expired_mark_without_followers(pg_store, "L")
    f = follower("f2", "L")
    values = {
        "b_scope": "default",
        "b_follower": "f2",
        "b_leader": "L",
        "b_task": f.task_name,
        "b_occurred": f.occurred_at,
        "b_ctype": f.content_type,
        "b_cenc": f.content_encoding,
        "b_payload": f.payload,
        "b_host": "",
        "b_ttl": TTL,
        "b_lookback": LOOKBACK,
    }
    # When f2 parks behind L (its mark refreshed, transaction open) while the sweep runs
    _expire_while_held(pg_store, pg_url, PARK, values)
    # Then L's success still finds f2 through the mark, at once
    record = pg_store.record_done_and_claim("default", "L", 100)
    assert record.waited
    claimed = record.claimed or pg_store.claim_followers("default", "L", 100)
    assert [c.follower_id for c in claimed] == ["f2"]


@pytest.mark.timeout(60)
def test_the_sweep_still_expires_what_nobody_holds(pg_store: SQLStore, pg_url: str) -> None:
    # The guard against writers must not keep old records forever.
    _expired_mark_without_followers(pg_store, "L")
    pg_store.record_done("default", "M", seen_ttl=TTL)
    age(pg_store, 2 * TTL)
    held_values = {
        "b_scope": "default",
        "b_task_id": "other",
        "b_failed": False,
        "b_ttl": TTL,
        "b_timeout": 60.0,
    }
    assert _expire_while_held(pg_store, pg_url, pg_store.record_sql, held_values) == 2
    assert pg_store.lookup("default", ["M", "other"]).done == {"other"}
