"""The statements of ordering keys: record a send as its key's newest task, free a key,
read a key's newest task, expire the memory of sends.

A key's row holds its newest task. A producer records a send with one upsert that
PostgreSQL and SQLite serialise on the row's primary key: of two producers recording on
one key at once, the second waits for the first's commit and then reads its task as the
previous one, so the sends of a key form a single chain whatever the number of
producers. A task that finishes frees its key only while it is still the newest task
(a DELETE that tests ``task_id``): a send recorded after it makes the DELETE match nothing,
and that send follows it through its done record.

Each send is also remembered (``causal_key_sends``) for the seen TTL. A task id sent again
(an outbox replaying a publish) gets the answer of its first send and leaves the key's row
alone: recorded a second time, it would stand at the end of the key while its first copy
runs in its first place, and a task sent after it would follow a task already done.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Double, and_, bindparam, case, delete, exists, literal, select, tuple_
from sqlalchemy.dialects import postgresql

from .schema import db_clock, key_sends, keys
from .statements import Insert

_KEY = (keys.c.scope == bindparam("b_scope"), keys.c.key == bindparam("b_key"))
_SEND = (key_sends.c.scope == bindparam("b_scope"), key_sends.c.task_id == bindparam("b_task"))

#: The task an earlier send of ``b_task`` was recorded behind (no row: never sent).
KNOWN_SEND = select(key_sends.c.previous).where(*_SEND)


def _tail_upsert(insert: Insert, source: Any = None) -> Any:
    """Make ``b_task`` the newest task of (``b_scope``, ``b_key``); return the task before
    it. From ``source``, one row or none (then nothing changes), if given."""
    if source is None:
        stmt = insert(keys).values(
            scope=bindparam("b_scope"),
            key=bindparam("b_key"),
            task_id=bindparam("b_task"),
            previous=None,
            recorded_at=db_clock(),
        )
    else:
        columns = ["scope", "key", "task_id", "previous", "recorded_at"]
        stmt = insert(keys).from_select(columns, source)
    again = keys.c.task_id == stmt.excluded.task_id
    return stmt.on_conflict_do_update(
        index_elements=["scope", "key"],
        set_={
            # Two producers sending the same new id at once: the second finds it newest.
            "previous": case((again, keys.c.previous), else_=keys.c.task_id),
            "recorded_at": case((again, keys.c.recorded_at), else_=stmt.excluded.recorded_at),
            "task_id": stmt.excluded.task_id,
        },
    ).returning(keys.c.previous)


def _new_tail() -> Any:
    return select(
        bindparam("b_scope"), bindparam("b_key"), bindparam("b_task"), literal(None), db_clock()
    )


def record_tail_statement(insert: Insert) -> Any:
    """SQLite's second step, after :data:`KNOWN_SEND` found no earlier send."""
    return _tail_upsert(insert)


def remember_send_statement(insert: Insert) -> Any:
    """SQLite's third step: remember the send and the task it was recorded behind."""
    return (
        insert(key_sends)
        .values(
            scope=bindparam("b_scope"),
            task_id=bindparam("b_task"),
            key=bindparam("b_key"),
            previous=bindparam("b_previous"),
            recorded_at=db_clock(),
        )
        .on_conflict_do_nothing()
    )


def _pg_record_key() -> Any:
    """PostgreSQL's one statement: the earlier send's answer, or a new tail and its memory.

    Data-modifying CTEs see the same snapshot: the tail upsert runs only if no earlier
    send of the id is remembered, and the memory row takes the upsert's answer.
    """
    known = KNOWN_SEND.cte("known")
    tail = _tail_upsert(postgresql.insert, _new_tail().where(~exists(select(known)))).cte("tail")
    remembered = (
        postgresql.insert(key_sends)
        .from_select(
            ["scope", "task_id", "key", "previous", "recorded_at"],
            select(
                bindparam("b_scope"),
                bindparam("b_task"),
                bindparam("b_key"),
                tail.c.previous,
                db_clock(),
            ),
        )
        .on_conflict_do_nothing()
        .cte("remembered")
    )
    return select(
        exists(select(known)).label("known"),
        select(known.c.previous).scalar_subquery().label("known_previous"),
        select(tail.c.previous).scalar_subquery().label("previous"),
    ).add_cte(remembered)


PG_RECORD_KEY = _pg_record_key()
FREE_KEY = delete(keys).where(*_KEY, keys.c.task_id == bindparam("b_task"))

#: Up to ``b_limit`` remembered sends older than ``b_ttl`` seconds.
EXPIRE_SENDS = delete(key_sends).where(
    tuple_(key_sends.c.scope, key_sends.c.task_id).in_(
        select(key_sends.c.scope, key_sends.c.task_id)
        .where(key_sends.c.recorded_at < db_clock() - bindparam("b_ttl", type_=Double))
        .order_by(key_sends.c.recorded_at)
        .limit(bindparam("b_limit"))
        .with_for_update(skip_locked=True)
    ),
    and_(key_sends.c.recorded_at < db_clock() - bindparam("b_ttl", type_=Double)),
)


def key_tails_statement(*, by_scope: bool) -> Any:
    """The rows of key ``b_key`` (in scope ``b_scope`` only, ``by_scope``), by scope: an
    operator's query, over a table of one row per key in use."""
    stmt = select(keys.c.scope, keys.c.key, keys.c.task_id, keys.c.previous, keys.c.recorded_at)
    stmt = stmt.where(keys.c.key == bindparam("b_key"))
    if by_scope:
        stmt = stmt.where(keys.c.scope == bindparam("b_scope"))
    return stmt.order_by(keys.c.scope)
