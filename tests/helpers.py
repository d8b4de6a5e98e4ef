"""Helpers shared by the test tiers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from celery import Celery
from sqlalchemy import make_url, text, update

from celery_causal.payload import build_message, pack
from celery_causal.sql import SQLStore
from celery_causal.sql.schema import done, followers, key_sends, keys
from celery_causal.store import CausalStore, Follower
from celery_causal.testing import MemoryStore

_APP = Celery("tests-helpers", set_as_current=False)


def driver_connection(url: str, **options: Any) -> psycopg.Connection[Any]:
    """A bare psycopg connection to the database of a store URL (``postgresql+psycopg``)."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(dsn, **options)


def follower(
    follower_id: str,
    leader_id: str,
    *,
    scope: str = "default",
    occurred_at: float = 1.0,
    task_name: str = "tests.step",
    ordering_key: str | None = None,
) -> Follower:
    """A parked follower as a worker stores it, its message bound for the default queue."""
    message = build_message(
        _APP, task_name, [], {}, {"task_id": follower_id, "queue": "celery"}, "json"
    )
    return pack(
        scope=scope,
        task_name=task_name,
        task_id=follower_id,
        leader=leader_id,
        occurred_at=occurred_at,
        message=message,
        max_bytes=1 << 20,
        hostname="worker@test",
        ordering_key=ordering_key,
    )


def age(store: CausalStore, seconds: float) -> None:
    """Make every parked row, claim and done record ``seconds`` older."""
    if isinstance(store, MemoryStore):
        base = store.clock
        store.clock = lambda: base() + seconds
        return
    assert isinstance(store, SQLStore)
    with store.engine.connect() as conn:
        conn.execute(
            update(followers).values(
                parked_at=followers.c.parked_at - seconds,
                deadline=followers.c.deadline - seconds,
                claimed_at=followers.c.claimed_at - seconds,
            )
        )
        conn.execute(
            update(done).values(
                done_at=done.c.done_at - seconds,
                failed_at=done.c.failed_at - seconds,
                expires_at=done.c.expires_at - seconds,
                waited_at=done.c.waited_at - seconds,
                release_due_at=done.c.release_due_at - seconds,
            )
        )
        conn.execute(update(keys).values(recorded_at=keys.c.recorded_at - seconds))
        conn.execute(update(key_sends).values(recorded_at=key_sends.c.recorded_at - seconds))


def truncate(store: SQLStore) -> None:
    with store.engine.connect() as conn:
        for table in (
            "causal_followers",
            "causal_done",
            "causal_dead_followers",
            "causal_keys",
            "causal_key_sends",
        ):
            conn.execute(text(f"DELETE FROM {table}"))


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
