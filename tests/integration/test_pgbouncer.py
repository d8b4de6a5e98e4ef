"""The store behind a real PgBouncer in transaction pooling mode.

A transaction pooler hands each transaction to whichever server connection is free: a
statement prepared on one server connection is unknown on the next (or collides with
another client's of the same name), and start-up options are refused. With
``causal_store_transaction_pooler`` the store uses neither.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from celery_causal.errors import ConfigurationError, StoreError
from celery_causal.sql import open_store
from celery_causal.store import ParkOutcome
from tests.conftest import fresh_database, service_missing
from tests.helpers import follower, truncate

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
LOOKBACK = 900.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database("_pgbouncer") as url:
        yield url


@pytest.fixture(scope="module")
def bouncer_url(database: str) -> Iterator[str]:
    """``database`` reached through a PgBouncer of this module (transaction pooling, two
    server connections for many clients)."""
    if not os.path.exists(PGBOUNCER):
        service_missing("PgBouncer (Debian package pgbouncer)", FileNotFoundError(PGBOUNCER))
    url = make_url(database)
    port = _free_port()
    # Not under pytest's temporary folders, which only root may enter.
    folder = Path(tempfile.mkdtemp(prefix="causal-pgbouncer-"))
    (folder / "users.txt").write_text(f'"{url.username}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={url.host} port={url.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
logfile = {folder / "pgbouncer.log"}
"""
    )
    # PgBouncer refuses to run as root.
    shutil.chown(folder, "postgres")
    for path in folder.iterdir():
        shutil.chown(path, "postgres")
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    with open(folder / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for_port(port, process, folder)
        yield url.set(port=port).render_as_string(hide_password=False)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], folder: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = [p.read_text() for p in folder.glob("*.txt") if p.name != "users.txt"]
            said += [p.read_text() for p in folder.glob("*.log")]
            raise AssertionError(f"pgbouncer exited: {said}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("pgbouncer did not listen in time")


def test_many_clients_park_and_release_through_a_transaction_pooler(
    database: str, bouncer_url: str
) -> None:
    # Given the schema (made directly) and a store per thread through PgBouncer, whose two
    # server connections serve every thread's statements in turn
    direct = open_store(database)
    direct.create_schema()
    truncate(direct)
    stores = [open_store(bouncer_url, transaction_pooler=True) for _ in range(4)]
    errors: list[BaseException] = []
    released: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(stores))

    def client(n: int) -> None:
        store = stores[n]
        try:
            barrier.wait()
            # More rounds than psycopg's prepare threshold (5), on each statement
            for i in range(12):
                leader, follower_id = f"L{n}-{i}", f"F{n}-{i}"
                assert store.lookup("default", [leader]).done == frozenset()
                outcome = store.park(follower(follower_id, leader), LOOKBACK)
                assert outcome is ParkOutcome.PARKED
                record = store.record_done_and_claim("default", leader, 10)
                claimed = list(record.claimed)
                if not record.complete:
                    claimed += store.claim_followers("default", leader, 10)
                store.finish(claimed)
                with lock:
                    released.extend(c.follower_id for c in claimed)
                store.stats()
        except BaseException as exc:  # reported below, with the thread's number
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        # Then nothing failed, and every follower was released exactly once
        assert errors == []
        assert sorted(released) == sorted(f"F{n}-{i}" for n in range(4) for i in range(12))
        assert direct.list_followers(None, None, 100) == []
    finally:
        for store in stores:
            store.close()
        truncate(direct)
        direct.close()


def test_without_the_setting_the_pooler_refuses_the_stores_start_up_options(
    bouncer_url: str,
) -> None:
    store = open_store(bouncer_url, create_schema=False)
    try:
        with pytest.raises(StoreError, match="options"):
            store.lookup("default", ["L"])
    finally:
        store.close()


def test_a_server_default_isolation_other_than_read_committed_is_a_clear_error(
    database: str, bouncer_url: str
) -> None:
    name = make_url(database).database
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'serializable'")
        )
    store = open_store(bouncer_url, create_schema=False, transaction_pooler=True)
    try:
        with pytest.raises(ConfigurationError, match="read committed"):
            # PgBouncer keeps server connections open: only a new one sees the new default
            with admin.connect() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
            for _ in range(5):
                try:
                    store.lookup("default", ["L"])
                except StoreError:
                    # PgBouncer found out only now that a server connection it held was
                    # terminated above: the store reconnects on the next call
                    continue
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_isolation'))
        admin.dispose()


def test_creating_the_schema_through_the_pooler_leaves_no_lock_behind(
    database: str, bouncer_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker's store through PgBouncer creating the schema, and other clients'
    # transactions that take the server connection it locked on as soon as it is free
    # (under load, the next statement of an autocommit client goes to any free server
    # connection: here, its schema lock is taken on one and released on the other)
    import psycopg

    import celery_causal.sql.store as sql_store

    direct = create_engine(database, isolation_level="AUTOCOMMIT")
    plain = make_url(bouncer_url).set(drivername="postgresql").render_as_string(False)
    held: list[psycopg.Connection[Any]] = []
    real_schema_objects = sql_store.schema_objects

    def schema_objects_under_load(conn: Any) -> set[str]:
        if not held:  # first call: just after the schema lock was taken
            with direct.connect() as admin:
                locker = admin.execute(
                    text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")
                ).scalar_one()
            clients = [psycopg.connect(plain, prepare_threshold=None) for _ in range(2)]
            for client in clients:  # each holds one of the pool's two server connections
                pid = client.execute("SELECT pg_backend_pid()").fetchone()
                if pid is not None and pid[0] == locker:
                    held.append(client)
                else:
                    client.rollback()  # frees the other server connection for the store
                    client.close()
            # A client holds the locker's server connection only where the store let it
            # go between its lock and its unlock (statements in autocommit)
        return real_schema_objects(conn)

    monkeypatch.setattr(sql_store, "schema_objects", schema_objects_under_load)
    with direct.connect() as admin:  # fresh server connections, whatever earlier tests did
        admin.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    store = open_store(bouncer_url, create_schema=False, transaction_pooler=True)
    try:
        # When it creates the schema and the other client's transaction ends
        store.create_schema()
        for client in held:
            client.rollback()  # its server connection goes back to the pool, clean
            client.close()
        # Then no schema lock is left held: another process creating the schema (a worker
        # starting, `celery causal migrate`) would otherwise wait for it forever
        with direct.connect() as admin:
            leftover = admin.execute(
                text(
                    "SELECT pid, query FROM pg_stat_activity WHERE pid IN "
                    "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"
                )
            ).all()
        assert leftover == []
    finally:
        store.close()
        for client in held:
            client.close()
        with direct.connect() as admin:  # the leaked lock goes with its server connection
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted"
                )
            )
        direct.dispose()
