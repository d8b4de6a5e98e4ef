"""Shared fixtures: real services, each test run in its own database and key prefix.

A missing service fails the run under ``CI=true`` and skips loudly elsewhere.
Override the defaults with CAUSAL_TEST_PG_URL (an admin URL; a database is created per run)
and CAUSAL_TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from celery_causal.sql import SQLStore, open_store
from tests.helpers import truncate

PG_ADMIN_URL = os.environ.get(
    "CAUSAL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CAUSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]

pytest_plugins = ["pytester"]


def service_missing(what: str, error: BaseException) -> None:
    message = f"{what} is not reachable ({error!r}); start it or set its CAUSAL_TEST_* URL"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(f"SKIPPED, SERVICE MISSING: {message}")


@contextmanager
def fresh_database(suffix: str = "") -> Iterator[str]:
    """Create a PostgreSQL database of this run, yield its URL, drop it afterwards."""
    name = f"causal_test_{RUN_ID}{suffix}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_missing("PostgreSQL", exc)
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test run, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        service_missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def key_prefix() -> Iterator[str]:
    """Redis key prefix of this run: two runs on one Redis never see each other's keys."""
    prefix = f"causal-test-{RUN_ID}:"
    yield prefix
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{prefix}*", count=1000):
            client.delete(key)
    except Exception:
        pass


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[SQLStore]:
    """The SQL store on this run's PostgreSQL database, emptied before and after the test."""
    store = open_store(pg_url)
    truncate(store)
    yield store
    truncate(store)
    store.close()
