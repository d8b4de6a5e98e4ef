"""Every statement of the park, release and duplicate paths pins ``scope`` on each table it
touches, so a PostgreSQL distributed by ``scope`` (Citus) routes it to one node.

A statement is read, not run: for each SELECT, UPDATE and DELETE over a store table, one of
the top-level AND terms of its WHERE must be ``<that table>.scope = :b_scope``; for each
INSERT, the value of its scope column must be ``:b_scope``. A term inside a subquery does not
count for the enclosing statement: that is what a distributed planner routes by.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
    Label,
)
from sqlalchemy.sql.selectable import Exists, Join, ScalarSelect, Select, SelectBase

from celery_causal.sql import housekeeping as hk
from celery_causal.sql import keys as ks
from celery_causal.sql import postgresql as pg
from celery_causal.sql import statements as sql
from celery_causal.sql.postgresql import PostgresStore
from celery_causal.sql.schema import dead_followers, done, followers, key_sends, keys, scope_counts

STORE_TABLES = (followers, done, dead_followers, keys, key_sends, scope_counts)


def _conjuncts(clause: Any) -> Iterator[Any]:
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        for term in clause.clauses:
            yield from _conjuncts(term)
    elif clause is not None:
        yield clause


def _pins_scope(where: Any, table: Any) -> bool:
    for term in _conjuncts(where):
        if isinstance(term, BinaryExpression) and term.operator is operators.eq:
            sides = (term.left, term.right)
            column = any(
                isinstance(s, ColumnClause) and s.table is table and s.name == "scope"
                for s in sides
            )
            bound = any(isinstance(s, BindParameter) and s.key == "b_scope" for s in sides)
            if column and bound:
                return True
    return False


def _store_table(from_: Any) -> Any:
    """``from_`` if it is a store table or an alias of one, else None."""
    base = getattr(from_, "element", from_)
    return from_ if any(base is t for t in STORE_TABLES) else None


def _inserted_scope(insert: Insert) -> Any:
    if insert.select is not None:
        names = list(insert._select_names or [])  # the column names of INSERT ... SELECT
        value = list(insert.select.selected_columns)[names.index("scope")]
    else:
        values = {getattr(k, "key", k): v for k, v in (insert._values or {}).items()}
        value = values["scope"]
    return value.element if isinstance(value, Label) else value


def _inserts_pinned_scope(insert: Insert) -> bool:
    """The scope inserted is ``:b_scope``, or copied from a row whose scope is pinned."""
    value = _inserted_scope(insert)
    if isinstance(value, BindParameter):
        return value.key == "b_scope"
    table = _store_table(getattr(value, "table", None))
    return table is not None and _pins_scope(insert.select.whereclause, table)


def _tables(from_: Any) -> Iterator[Any]:
    """The tables (and aliases) of a FROM item, a join's on both sides."""
    if isinstance(from_, Join):
        yield from _tables(from_.left)
        yield from _tables(from_.right)
    elif _store_table(from_) is not None:
        yield from_


def _read_in(where: Any) -> Iterator[Any]:
    """The tables whose columns ``where`` reads outside its subqueries (an UPDATE ... FROM
    or DELETE ... USING reads them); a subquery is checked as a statement of its own."""
    stack = [where] if where is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, SelectBase | Exists | ScalarSelect):
            continue
        if isinstance(node, ColumnClause) and _store_table(node.table) is not None:
            yield node.table
        stack.extend(node.get_children())


def unpinned(statement: Any) -> list[str]:
    """Descriptions of the parts of ``statement`` that touch a store table without pinning
    its scope; empty if the statement is routable by scope."""
    found: list[str] = []
    for node in visitors.iterate(statement):
        if isinstance(node, Select):
            for from_ in node.get_final_froms():
                for table in _tables(from_):
                    if not _pins_scope(node.whereclause, table):
                        found.append(f"SELECT over {table.name}")
        elif isinstance(node, Update | Delete):
            for table in {node.table, *_read_in(node.whereclause)}:
                if not _pins_scope(node.whereclause, table):
                    found.append(f"{type(node).__name__.upper()} reading {table.name}")
        elif isinstance(node, Insert) and not _inserts_pinned_scope(node):
            found.append(f"INSERT into {node.table.name}")
    return sorted(set(found))


#: The statements of a task's paths on PostgreSQL: its arrival check and duplicate check, its
#: park, its done record and the release of its followers (with the depth guard, and the
#: burial of a follower whose message cannot be read), and an operator's per-task commands.
TASK_PATH = {
    "lookup of 1 id": sql.lookup_statement(1),
    "lookup of 3 ids": sql.lookup_statement(3),
    "park": pg.PARK,
    "done record": PostgresStore.record_sql,
    "done record and claim": pg.RECORD_AND_CLAIM,
    "claim followers": PostgresStore.claim_followers_sql,
    "finish": pg.FINISH,
    "unclaim": sql.UNCLAIM,
    "depth guard": sql.MAKE_DUE,
    "count waiting": hk.COUNT_WAITING,
    "bury": PostgresStore.bury_sql,
    "bury's delete": hk.REMOVE_ROW,
    "unpostpone": hk.UNPOSTPONE,
    "forget": hk.FORGET,
    "operator release": PostgresStore.claim_one_sql,
    "release of a ring's first": PostgresStore.claim_due_one_sql,
    "show one follower": hk.follower_statement(["scope", "follower_id"]),
    "record a send under a key": ks.PG_RECORD_KEY,
    "record a send under a key (SQLite: known?)": ks.KNOWN_SEND,
    "record a send under a key (SQLite: tail)": PostgresStore.record_tail_sql,
    "record a send under a key (SQLite: memory)": PostgresStore.remember_send_sql,
    "free a key": ks.FREE_KEY,
    "a key's newest task in one scope": ks.key_tails_statement(by_scope=True),
}

#: The statements that span scopes by design (ARCHITECTURE.md, "Past one PostgreSQL"): the
#: sweep's and an operator's whole-store views. A distributed planner runs them on every node.
ACROSS_SCOPES = {
    "sweep: claim stuck": PostgresStore.claim_stuck_sql,
    "sweep: claim lost": PostgresStore.claim_lost_sql,
    "sweep: claim stuck (the claim alone)": sql.CLAIM_STUCK,
    "sweep: claim lost (the claim alone)": sql.CLAIM_LOST,
    "sweep: leader walk": hk.LEADER_WALK,
    "sweep: ring candidates": hk.RING_CANDIDATES,
    "sweep: postpone": hk.POSTPONE,
    "sweep: clear releases": hk.CLEAR_RELEASES,
    "sweep: orphaned leaders": hk.ORPHANED_LEADERS,
    "sweep: expire outcomes": hk.EXPIRE_OUTCOMES,
    "sweep: expire marks": hk.EXPIRE_MARKS,
    "status": hk.STATS,
    "status: dead per scope": hk.DEAD_PER_SCOPE,
    "scopes of a task id": hk.SCOPES_OF,
    "list across scopes": hk.list_statement(["scope"], by_scope=False, by_leader=False),
    "list by leader across scopes": hk.list_statement(["scope"], by_scope=False, by_leader=True),
    "count across scopes": hk.count_statement(by_scope=False, by_leader=False),
    "count by leader across scopes": hk.count_statement(by_scope=False, by_leader=True),
    "a key's newest task in every scope": ks.key_tails_statement(by_scope=False),
    "sweep: forget old sends under keys": ks.EXPIRE_SENDS,
    "sweep: tidy the scope counts": pg.TIDY_COUNTS,
    "sweep: drop scope counts at zero (SQLite)": hk.DROP_EMPTY_COUNTS,
    "list by key across scopes": hk.list_statement(
        ["scope"], by_scope=False, by_leader=False, by_key=True
    ),
}


@pytest.mark.parametrize("name", sorted(TASK_PATH))
def test_task_path_statement_pins_its_scope_on_every_table(name: str) -> None:
    assert unpinned(TASK_PATH[name]) == []


@pytest.mark.parametrize("name", sorted(ACROSS_SCOPES))
def test_statements_listed_as_spanning_scopes_do_span_them(name: str) -> None:
    # If one becomes routable, it belongs in TASK_PATH and ARCHITECTURE.md's list shrinks.
    assert unpinned(ACROSS_SCOPES[name]) != []


def test_every_statement_of_the_store_that_spans_scopes_is_listed() -> None:
    """A statement added to the store is routable, or listed above (and in ARCHITECTURE.md)."""
    listed = {id(s) for s in ACROSS_SCOPES.values()}
    prebuilt = [
        (f"{m.__name__}.{name}", value)
        for m in (sql, hk, pg, ks)
        for name, value in vars(m).items()
        if name.isupper()
    ]
    prebuilt += [
        (f"PostgresStore.{n}", v) for n, v in vars(PostgresStore).items() if n.endswith("_sql")
    ]
    statements = [(n, v) for n, v in prebuilt if isinstance(v, Select | Insert | Update | Delete)]
    assert len(statements) > 20
    spanning = [n for n, v in statements if unpinned(v) and id(v) not in listed]
    assert spanning == []


def test_the_check_catches_a_statement_that_does_not_pin_its_scope() -> None:
    """The checker itself: a claim by row id alone, or a scope pinned only in a subquery."""
    from sqlalchemy import bindparam, literal, select, update

    by_id = update(followers).where(followers.c.id == bindparam("b_id"))
    inner_only = update(followers).where(
        followers.c.id.in_(
            select(followers.c.id)
            .where(followers.c.scope == bindparam("b_scope"))
            .scalar_subquery()
        )
    )
    other_scope = select(done.c.task_id).where(done.c.scope == bindparam("b_other"))
    joined = select(followers.c.id).select_from(
        followers.join(done, done.c.task_id == followers.c.leader_id)
    )
    reading_another_table = update(followers).where(
        followers.c.scope == bindparam("b_scope"), followers.c.leader_id == done.c.task_id
    )
    # The restart as postgresql.py builds it, its probe of causal_done's marks unscoped
    claimed = sql.CLAIM_FOLLOWERS.cte("claimed")
    heads = sql.marked(claimed, scoped=False).subquery("heads")
    behind = sql.waiting_behind(heads, scoped=True).offset(0).lateral("behind")
    restart = sql.restart_lookback(
        select(behind.c.id).select_from(heads.join(behind, literal(True))), scoped=True
    ).cte("restarted")
    assert unpinned(by_id) == ["UPDATE reading causal_followers"]
    assert unpinned(inner_only) == ["UPDATE reading causal_followers"]
    assert unpinned(other_scope) == ["SELECT over causal_done"]
    assert unpinned(joined) == ["SELECT over causal_done", "SELECT over causal_followers"]
    assert unpinned(reading_another_table) == ["UPDATE reading causal_done"]
    assert unpinned(select(*claimed.c).add_cte(restart)) == ["SELECT over causal_done"]
