from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_causal.sql import SQLStore, open_store
from celery_causal.store import CausalStore
from celery_causal.testing import MemoryStore
from tests.helpers import truncate


def _emptied_sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    """The SQL store ``request.param`` names, empty before and after the test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'causal.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    sql = open_store(url)
    truncate(sql)
    try:
        yield sql
    finally:
        truncate(sql)
        sql.close()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CausalStore]:
    """Every store that implements the contract; the same tests run against each."""
    if request.param == "memory":
        yield MemoryStore()
        return
    yield from _emptied_sql_store(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    """Each SQL store, for tests that also read its tables."""
    yield from _emptied_sql_store(request, tmp_path)


@pytest.fixture(params=["memory", "postgresql"])
def causal_store(request: pytest.FixtureRequest) -> Iterator[CausalStore]:
    """The store an in-process worker uses: the memory store, or PostgreSQL."""
    if request.param == "memory":
        yield MemoryStore()
        return
    store = open_store(request.getfixturevalue("pg_url"))
    truncate(store)
    yield store
    truncate(store)
    store.close()
