"""The statements of ordering keys: record a send as its key's newest task, free a key,
read a key's newest task.

A key's row holds its newest task. A producer records a send with one upsert that
PostgreSQL and SQLite serialise on the row's primary key: of two producers recording on
one key at once, the second waits for the first's commit and then reads its task as the
previous one, so the sends of a key form a single chain whatever the number of
producers. A task that finishes frees its key only while it is still the newest task
(a DELETE that tests ``task_id``): a send recorded after it makes the DELETE match nothing,
and that send follows it through its done record.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, case, delete, select

from .schema import db_clock, keys
from .statements import Insert

_KEY = (keys.c.scope == bindparam("b_scope"), keys.c.key == bindparam("b_key"))


def record_key_statement(insert: Insert) -> Any:
    """Make ``b_task`` the newest task of (``b_scope``, ``b_key``); return the one before.

    Recording the newest task again (a producer retrying its send) changes nothing and
    returns the same predecessor, so the task never follows itself.
    """
    stmt = insert(keys).values(
        scope=bindparam("b_scope"),
        key=bindparam("b_key"),
        task_id=bindparam("b_task"),
        previous=None,
        recorded_at=db_clock(),
    )
    again = keys.c.task_id == stmt.excluded.task_id
    return stmt.on_conflict_do_update(
        index_elements=["scope", "key"],
        set_={
            "previous": case((again, keys.c.previous), else_=keys.c.task_id),
            "recorded_at": case((again, keys.c.recorded_at), else_=stmt.excluded.recorded_at),
            "task_id": stmt.excluded.task_id,
        },
    ).returning(keys.c.previous)


FREE_KEY = delete(keys).where(*_KEY, keys.c.task_id == bindparam("b_task"))


def key_tails_statement(*, by_scope: bool) -> Any:
    """The rows of key ``b_key`` (in scope ``b_scope`` only, ``by_scope``), by scope: an
    operator's query, over a table of one row per key in use."""
    stmt = select(keys.c.scope, keys.c.key, keys.c.task_id, keys.c.previous, keys.c.recorded_at)
    stmt = stmt.where(keys.c.key == bindparam("b_key"))
    if by_scope:
        stmt = stmt.where(keys.c.scope == bindparam("b_scope"))
    return stmt.order_by(keys.c.scope)
