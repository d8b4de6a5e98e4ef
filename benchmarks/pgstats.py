"""Statements and PostgreSQL execution time per task, read from ``pg_stat_statements``.

Only the store's statements count: those of the store's role in the store's database.
The benchmark's own set-up (inserting rows, ANALYZE) and its polling (``stats()`` while it
waits) connect as the superuser and are left out. Execution time is the server's
(``total_exec_time``; planning is not tracked, as by default).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine, text

from benchmarks.cluster import STORE_DB, STORE_ROLE

#: What a store statement does, recognised from its text (first match wins).
KINDS = [
    ("park", re.compile(r"INSERT INTO causal_followers", re.I)),
    ("record+claim", re.compile(r"INSERT INTO causal_done.*UPDATE causal_followers", re.I | re.S)),
    ("record", re.compile(r"INSERT INTO causal_done", re.I)),
    ("delete released", re.compile(r"^DELETE FROM causal_followers", re.I)),
    ("claim", re.compile(r"UPDATE causal_followers SET claimed_at", re.I)),
    ("lookup", re.compile(r"^SELECT .*FROM causal_done", re.I | re.S)),
    ("expire outcomes", re.compile(r"^DELETE FROM causal_done", re.I)),
    ("update outcomes", re.compile(r"^UPDATE causal_done", re.I)),
]

_READ = text(
    "SELECT query, calls, total_exec_time FROM pg_stat_statements "
    "WHERE userid = (SELECT oid FROM pg_roles WHERE rolname = :role) "
    "AND dbid = (SELECT oid FROM pg_database WHERE datname = :db) AND calls > 0"
)


def kind_of(query: str) -> str:
    for name, pattern in KINDS:
        if pattern.search(query):
            return name
    return " ".join(query.split())[:60]


@dataclass
class StatementCounts:
    """The store's statements during one measured stretch."""

    #: kind -> [calls, execution ms]
    by_kind: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: StatementCounts) -> None:
        for kind, (calls, ms) in other.by_kind.items():
            mine = self.by_kind.setdefault(kind, [0, 0.0])
            mine[0] += calls
            mine[1] += ms

    @property
    def calls(self) -> int:
        return int(sum(c for c, _ in self.by_kind.values()))

    @property
    def exec_ms(self) -> float:
        return sum(ms for _, ms in self.by_kind.values())

    def count(self, kind: str) -> int:
        return int(self.by_kind.get(kind, [0, 0.0])[0])

    def per_task(self, tasks: int) -> dict[str, Any]:
        """Statements and execution time per task, with each kind's share."""
        return {
            "tasks": tasks,
            "statements_per_task": self.calls / tasks,
            "exec_ms_per_task": self.exec_ms / tasks,
            "by_kind": {
                kind: {
                    "calls": int(calls),
                    "per_task": calls / tasks,
                    "ms_per_call": ms / calls if calls else 0.0,
                }
                for kind, (calls, ms) in sorted(self.by_kind.items(), key=lambda kv: -kv[1][1])
            },
        }


class StatementStats:
    def __init__(self, admin_url: str) -> None:
        self.engine: Engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def reset(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_statements_reset()"))

    def read(self) -> StatementCounts:
        counts = StatementCounts()
        with self.engine.connect() as conn:
            rows = conn.execute(_READ, {"role": STORE_ROLE, "db": STORE_DB}).all()
        for query, calls, ms in rows:
            mine = counts.by_kind.setdefault(kind_of(query), [0, 0.0])
            mine[0] += int(calls)
            mine[1] += float(ms)
        return counts

    @contextmanager
    def measuring(self, into: StatementCounts) -> Iterator[None]:
        """Reset the statistics, run the block, add what the store ran to ``into``."""
        self.reset()
        yield
        into.add(self.read())

    def close(self) -> None:
        self.engine.dispose()
