"""Connections of the SQL store: one engine per process, autocommit, errors mapped.

Kept apart from the statements (``statements.py``, run by the stores): this module knows
how to reach the database and what its failures mean, not what is asked of it. It is the
only reader of the URL's dialect (:func:`dialect_of`).
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg import RawCursor
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from ..errors import CausalError, ConfigurationError, StoreError, StoreUnavailable
from ..settings import engine_url, mask_url

T = TypeVar("T")

#: The databases the store runs on, by SQLAlchemy dialect name.
POSTGRESQL, SQLITE = "postgresql", "sqlite"


def checked_url(url: str) -> URL:
    """The URL the store connects with; :class:`ConfigurationError` for an unsupported
    database or driver. The dialect is read from the parsed URL: "postgresql+asyncpg"
    starts like ours."""
    try:
        return engine_url(url)
    except ValueError as exc:
        raise ConfigurationError(f"causal_store_url: {exc} (got {mask_url(url)!r})") from None


def dialect_of(url: str) -> str:
    """:data:`POSTGRESQL` or :data:`SQLITE`: which database ``url`` names."""
    return checked_url(url).get_backend_name()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets prefork children read while one writes; busy_timeout makes writers queue
    # instead of failing with "database is locked". synchronous=FULL: a parked row's message
    # is acked at the broker once the row is committed, so the commit must reach the disk
    # (in WAL mode, NORMAL may lose the last commits to a power loss).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _dispose(engine: Engine, pid: int) -> None:
    engine.dispose(close=os.getpid() == pid)


def _require_read_committed(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SHOW default_transaction_isolation")
        (level,) = cursor.fetchone()
    if level != "read committed":
        raise ConfigurationError(
            f"causal_store_transaction_pooler: the server's default_transaction_isolation is "
            f"{level!r}; the store needs 'read committed' (ALTER ROLE ... SET "
            "default_transaction_isolation = 'read committed')"
        )


def _with_read_committed(url: str) -> str:
    """libpq start-up ``options`` pinning READ COMMITTED, after any the URL carries."""
    given = make_url(url).query.get("options") or ""
    if not isinstance(given, str):
        given = " ".join(given)
    return f"{given} -c default_transaction_isolation=read\\ committed".strip()


#: The execution option that marks a statement to be planned on every call.
UNPREPARED = "causal_unprepared"

#: A named placeholder of psycopg's query syntax, or an escaped percent sign.
_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")


def native_placeholders(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``sql`` with PostgreSQL's own ``$n`` placeholders for psycopg's ``%(name)s`` ones,
    and the parameter names in ``$n`` order (a name used twice is one parameter).

    psycopg converts a query's placeholders on every execute and caches the conversion
    only for queries up to 4 kB; the store's longer statements (the record-and-claim) were
    parsed again on each call, about a tenth of a millisecond of CPU. Converted once here,
    they run on psycopg's ``RawCursor``, which sends the query as it is.
    """
    names: dict[str, int] = {}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            if match.group(0) == "%%":
                return "%"
            raise ValueError(f"unsupported placeholder at {match.start()} in {sql[:80]!r}")
        number = names.setdefault(name, len(names) + 1)
        return f"${number}"

    converted = _PLACEHOLDER.sub(replace, sql)
    return converted.encode("utf-8"), tuple(names)


@dataclass(frozen=True)
class Compiled:
    """A statement compiled once for the engine's dialect, run on the bare DBAPI cursor."""

    #: As SQLAlchemy compiled it; run as it is where :attr:`native` is ``None`` (SQLite).
    sql: str
    #: Values of binds the statement carries itself (literals), merged under the caller's.
    defaults: Mapping[str, Any]
    #: Parameter names in order: SQLite's ``?`` or PostgreSQL's ``$n`` (:attr:`native`).
    positions: tuple[str, ...] | None
    #: Whether it returns rows (a SELECT, or DML with RETURNING), known without asking
    #: the cursor: psycopg builds its column descriptions anew each time it is asked.
    returns_rows: bool = True
    #: Planned anew on every call (a statement marked with the :data:`UNPREPARED` execution option
    #: on a driver that prepares); see FINISH in postgresql.py for why one is.
    unprepared: bool = False
    #: The statement in PostgreSQL's own syntax (``$n``), run on psycopg's RawCursor with
    #: ``positions``; ``None`` where the driver converts placeholders itself.
    native: bytes | None = None

    def bind(self, params: Mapping[str, Any]) -> Any:
        merged = {**self.defaults, **params}
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)

    def execute(self, connection: Any, params: Mapping[str, Any]) -> Any:
        """Run on a DBAPI ``connection`` (psycopg's or sqlite3's); return its cursor."""
        if self.native is None:
            cursor = connection.cursor()
            query: Any = self.sql
            options: dict[str, Any] = {}
        else:
            cursor = RawCursor(connection)
            query = self.native
            options = {"prepare": False} if self.unprepared else {}
        try:
            cursor.execute(query, self.bind(params), **options)
        except BaseException:
            cursor.close()
            raise
        return cursor


class Database:
    """A URL's engine, rebuilt in each process, and :meth:`run` with its error mapping."""

    def __init__(
        self,
        url: str,
        on_new_engine: Callable[[], object] | None = None,
        *,
        transaction_pooler: bool = False,
    ) -> None:
        self.url = url
        #: Reached through a transaction-pooling proxy (PgBouncer's pool_mode=transaction).
        self.transaction_pooler = transaction_pooler
        self._engine_url = checked_url(url)
        self.dialect = self._engine_url.get_backend_name()
        self._on_new_engine = on_new_engine
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        # Engines never cross a fork: Celery's prefork children inherit the parent's
        # memory, and a pooled connection used by two processes corrupts both sessions.
        # A child sees a different pid and builds its own engine; the inherited one is
        # dropped without closing the parent's sockets.
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            with self._lock:
                if self._engine is None or self._pid != pid:
                    if self._engine is not None:
                        self._engine.dispose(close=False)
                    self._engine = self._make_engine()
                    # A store dropped with its app (the registry holds apps weakly) closes
                    # its pooled connections, in the process that opened them only.
                    weakref.finalize(self, _dispose, self._engine, pid)
                    self._pid = pid
                    if self._on_new_engine is not None:
                        self._on_new_engine()
        return self._engine

    def _make_engine(self) -> Engine:
        # Every statement runs in autocommit, so a returned connection has no transaction
        # to roll back: skipping the reset saves a round of pool work on every call.
        if self.dialect == SQLITE:
            engine = create_engine(
                self._engine_url,
                isolation_level="AUTOCOMMIT",
                connect_args={"timeout": 30},
                pool_reset_on_return=None,
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        # The park/release handshake relies on READ COMMITTED: each statement's INSERT ...
        # ON CONFLICT reads the newest committed version of the leader's row. Under a
        # server default of REPEATABLE READ or SERIALIZABLE that statement fails with a
        # serialization error instead. Set at connection start-up, so it needs no
        # statement of its own.
        connect_args: dict[str, Any] = {"options": _with_read_committed(self.url)}
        if self.transaction_pooler:
            # A transaction pooler hands each transaction to any server connection: a
            # statement prepared on one is unknown on the next, or collides with another
            # client's of the same name. Poolers also refuse or drop start-up options, so
            # the isolation level is the server's own: checked once per connection.
            connect_args = {"prepare_threshold": None}
        engine = create_engine(
            self._engine_url,
            isolation_level="AUTOCOMMIT",
            pool_size=5,
            max_overflow=10,
            pool_reset_on_return=None,
            connect_args=connect_args,
        )
        if self.transaction_pooler:
            event.listen(engine, "connect", _require_read_committed)
        return engine

    def run(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation(connection)``; one immediate retry after a dropped connection.

        Every store operation is safe to repeat (inserts are ON CONFLICT, claims move rows
        out of ``waiting`` once), so a retry after a connection was cut mid-statement cannot
        duplicate or lose anything. A database that cannot be reached raises
        :class:`StoreUnavailable` (the task retries); one that refuses the statement raises
        :class:`StoreError` (the task fails: retrying would not help).
        """
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    return operation(conn)
            except DBAPIError as exc:
                if exc.connection_invalidated and attempt == 1:
                    continue
                unavailable = exc.connection_invalidated or isinstance(
                    exc, (OperationalError, InterfaceError)
                )
                raise self._mapped(exc, exc.orig, unavailable=unavailable) from exc
            except SATimeoutError as exc:  # no pooled connection came free in time
                raise StoreUnavailable(f"causal store {mask_url(self.url)}: {exc}") from exc
        raise AssertionError("unreachable")

    def compile(self, statement: Any) -> Compiled:
        dialect = self.engine.dialect
        compiled = statement.compile(dialect=dialect)
        positions = tuple(compiled.positiontup) if dialect.positional else None
        dml = compiled.isinsert or compiled.isupdate or compiled.isdelete
        returns_rows = not dml or bool(compiled.effective_returning)
        unprepared = bool(statement.get_execution_options().get(UNPREPARED))
        native = None
        if self.dialect == POSTGRESQL:
            native, positions = native_placeholders(str(compiled))
        return Compiled(
            str(compiled),
            dict(compiled.params),
            positions,
            returns_rows,
            unprepared and self.dialect == POSTGRESQL,
            native,
        )

    def fetch(self, compiled: Compiled, params: Mapping[str, Any]) -> list[Any]:
        """Run one prebuilt statement on a pooled connection's bare DBAPI cursor.

        The hot path of every causal task (the check, the park, the done record, the
        claim): it skips SQLAlchemy's per-execution work, which costs more CPU than the
        round trip itself. Errors, retry and invalidation follow :meth:`run`.
        """
        dbapi: Any = self.engine.dialect.dbapi
        for attempt in (1, 2):
            try:
                raw = self.engine.raw_connection()
            except DBAPIError as exc:
                raise self._mapped(exc, exc.orig, unavailable=True) from exc
            except dbapi.Error as exc:  # the pool hands out the driver's own connect error
                raise self._mapped(exc, exc, unavailable=True) from exc
            except SATimeoutError as exc:
                raise StoreUnavailable(f"causal store {mask_url(self.url)}: {exc}") from exc
            try:
                cursor = compiled.execute(raw.driver_connection, params)
                try:
                    return list(cursor.fetchall()) if compiled.returns_rows else []
                finally:
                    cursor.close()
            except dbapi.Error as exc:
                disconnected = self.engine.dialect.is_disconnect(exc, raw.dbapi_connection, None)
                if disconnected:
                    raw.invalidate(exc)
                    if attempt == 1:
                        continue
                unavailable = disconnected or isinstance(
                    exc, (dbapi.OperationalError, dbapi.InterfaceError)
                )
                raise self._mapped(exc, exc, unavailable=unavailable) from exc
            finally:
                raw.close()
        raise AssertionError("unreachable")

    def _mapped(self, exc: Exception, orig: Any, *, unavailable: bool) -> CausalError:
        reason = f"{type(orig).__name__}: {' '.join(str(orig).split())}"
        message = f"causal store {mask_url(self.url)} failed: {reason}"
        return StoreUnavailable(message) if unavailable else StoreError(message)

    def sqlite_file_missing(self) -> bool:
        """A SQLite URL naming a file that does not exist (connecting would create it)."""
        url = self._engine_url
        if self.dialect != SQLITE or url.query.get("uri"):  # a "file:" URI: sqlite3 decides
            return False
        return url.database not in (None, "", ":memory:") and not os.path.exists(url.database)

    def has_engine(self) -> bool:
        return self._engine is not None and self._pid == os.getpid()

    def close(self) -> None:
        if self.has_engine():
            assert self._engine is not None
            self._engine.dispose()
        self._engine = None
