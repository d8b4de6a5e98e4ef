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


def open_store(
    url: str, *, create_schema: bool = True, transaction_pooler: bool = False
) -> SQLStore:
    """The store for ``url`` (``postgresql+psycopg://...`` or ``sqlite:///...``).

    Nothing connects yet. With ``create_schema``, each process creates missing tables when
    it first connects. ``transaction_pooler``: PostgreSQL is reached through a
    transaction-pooling proxy such as PgBouncer (no prepared statements, no start-up
    options).
    """
    dialect = dialect_of(url)
    if dialect == POSTGRESQL:
        return PostgresStore(
            url, create_schema=create_schema, transaction_pooler=transaction_pooler
        )
    if dialect == SQLITE:
        return SQLiteStore(url, create_schema=create_schema)
    raise ConfigurationError(
        f"causal_store_url {mask_url(url)!r}: unsupported database {dialect!r}; "
        "use postgresql+psycopg://... or sqlite:///..."
    )
