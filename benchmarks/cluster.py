"""A throwaway PostgreSQL cluster for one benchmark run, configured as a production server.

``initdb`` and ``pg_ctl`` come from the installed server (the newest under
``/usr/lib/postgresql/*/bin``, or ``CAUSAL_BENCH_PG_BIN``). The cluster keeps PostgreSQL's
default configuration (autovacuum on, no planner switches) and adds only what the
benchmark needs to read: ``pg_stat_statements``. It listens on loopback on a free port,
lives in a temporary folder, and is stopped and removed when the run ends, also on Ctrl-C
or an exception. The shared server the tests use is never touched.

PostgreSQL refuses to run as root: as root, every server command runs as the ``postgres``
OS user (``runuser``), and the temporary folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

#: The role and database of the store: workers connect as this role, so that
#: ``pg_stat_statements`` rows of the store are told apart from the benchmark's own
#: set-up and polling, which connect as the superuser.
STORE_ROLE = "causal"
STORE_DB = "causal_bench"
SUPERUSER = "postgres"

#: Added to initdb's postgresql.conf. Everything else stays at PostgreSQL's defaults.
SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
pg_stat_statements.max = 5000
"""

#: With CAUSAL_BENCH_EXPLAIN_MS set, the plan of every statement slower than that many
#: milliseconds goes to the server log, which is kept in $TMPDIR as causal-bench-pg.log.
EXPLAIN_SETTINGS = """
session_preload_libraries = 'auto_explain'
auto_explain.log_min_duration = '{ms}ms'
auto_explain.log_analyze = on
auto_explain.log_buffers = on
"""


class ClusterUnavailable(RuntimeError):
    """The benchmark cannot start its own PostgreSQL cluster here."""


@dataclass(frozen=True)
class Cluster:
    bindir: Path
    datadir: Path
    port: int

    def url(self, user: str, database: str) -> str:
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    @property
    def store_url(self) -> str:
        return self.url(STORE_ROLE, STORE_DB)

    @property
    def admin_url(self) -> str:
        """The superuser on the store's database: set-up, polling and statistics."""
        return self.url(SUPERUSER, STORE_DB)

    @property
    def version(self) -> str:
        return (self.datadir / "PG_VERSION").read_text().strip()


def server_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` of the installed server are."""
    given = os.environ.get("CAUSAL_BENCH_PG_BIN")
    candidates = [given] if given else glob.glob("/usr/lib/postgresql/*/bin")
    found = [Path(c) for c in candidates if (Path(c) / "initdb").exists()]
    if not found:
        raise ClusterUnavailable(
            "no initdb found (looked in /usr/lib/postgresql/*/bin; set CAUSAL_BENCH_PG_BIN): "
            "the benchmark starts its own PostgreSQL server and needs the server package "
            "(Debian: postgresql)"
        )
    found.sort(key=lambda p: float(p.parent.name) if p.parent.name.isdigit() else 0.0)
    bindir = found[-1]
    sharedir = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"]
        if (bindir / "pg_config").exists()
        else ["pg_config", "--sharedir"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    control = Path(sharedir or f"/usr/share/postgresql/{bindir.parent.name}")
    if not (control / "extension" / "pg_stat_statements.control").exists():
        raise ClusterUnavailable(
            f"pg_stat_statements is not installed for the server in {bindir} (no "
            f"{control}/extension/pg_stat_statements.control); the benchmark reads statements "
            "per task from it (Debian ships it with the server; elsewhere: postgresql-contrib)"
        )
    return bindir


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", SUPERUSER, "--", *argv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(_as_server_user(argv), capture_output=True, text=True, check=False)
    if done.returncode:
        raise ClusterUnavailable(f"{what} failed ({done.returncode}): {done.stderr.strip()}")


def _init(bindir: Path, folder: Path) -> Cluster:
    if os.geteuid() == 0:
        user = pwd.getpwnam(SUPERUSER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    datadir = folder / "data"
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        ],
        "initdb",
    )
    port = _free_port()
    with open(datadir / "postgresql.conf", "a") as conf:
        conf.write(SETTINGS.format(port=port, socket_dir=folder))
        if os.environ.get("CAUSAL_BENCH_EXPLAIN_MS"):
            conf.write(EXPLAIN_SETTINGS.format(ms=int(os.environ["CAUSAL_BENCH_EXPLAIN_MS"])))
    return Cluster(bindir, datadir, port)


def _prepare(cluster: Cluster) -> None:
    """The store's role and database, and the statistics extension in it."""
    admin = create_engine(cluster.url(SUPERUSER, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {STORE_ROLE} LOGIN"))
        conn.execute(text(f"CREATE DATABASE {STORE_DB} OWNER {STORE_ROLE}"))
    admin.dispose()
    admin = create_engine(cluster.admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE EXTENSION pg_stat_statements"))
    admin.dispose()


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """Start a fresh cluster; stop it and delete its folder however the block ends."""
    bindir = server_bindir()
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        raise ClusterUnavailable("running as root needs runuser to start PostgreSQL as postgres")
    folder = Path(tempfile.mkdtemp(prefix="causal-bench-pg-"))
    started = False
    try:
        cluster = _init(bindir, folder)
        log = folder / "server.log"
        # Its own session: a Ctrl-C meant for the benchmark must not stop the server
        # before the benchmark's own clean-up has run.
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-w"]
        start = subprocess.run(
            _as_server_user([*pg_ctl, "-l", str(log), "start"]),
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
        )
        started = True
        if start.returncode:
            tail = log.read_text()[-2000:] if log.exists() else start.stderr
            raise ClusterUnavailable(f"pg_ctl start failed: {tail.strip()}")
        _prepare(cluster)
        yield cluster
    finally:
        if started:
            subprocess.run(
                _as_server_user([*pg_ctl, "-m", "fast", "stop"]),
                capture_output=True,
                check=False,
            )
        if os.environ.get("CAUSAL_BENCH_EXPLAIN_MS") and (folder / "server.log").exists():
            keep = Path(os.environ.get("TMPDIR", "/tmp")) / "causal-bench-pg.log"
            shutil.copyfile(folder / "server.log", keep)
        shutil.rmtree(folder, ignore_errors=True)
