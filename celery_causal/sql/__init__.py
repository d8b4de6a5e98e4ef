"""The SQL store: PostgreSQL in production, SQLite as the embedded default.

Read ``celery_causal/store.py`` (the contract), then ``postgresql.py`` or ``sqlite.py``
(how each dialect keeps it), then ``statements.py`` (the SQL).
"""

from __future__ import annotations

from ..errors import ConfigurationError
from ..settings import mask_url
from .engine import POSTGRESQL, SQLITE, dialect_of
from .postgresql import PostgresStore
from .sqlite import SQLiteStore
from .store import SQLStore

__all__ = ["PostgresStore", "SQLStore", "SQLiteStore", "open_store"]


def open_store(url: str, *, create_schema: bool = True) -> SQLStore:
    """The store for ``url`` (``postgresql+psycopg://...`` or ``sqlite:///...``).

    Nothing connects yet. With ``create_schema``, each process creates missing tables when
    it first connects.
    """
    dialect = dialect_of(url)
    if dialect == POSTGRESQL:
        return PostgresStore(url, create_schema=create_schema)
    if dialect == SQLITE:
        return SQLiteStore(url, create_schema=create_schema)
    raise ConfigurationError(
        f"causal_store_url {mask_url(url)!r}: unsupported database {dialect!r}; "
        "use postgresql+psycopg://... or sqlite:///..."
    )
