"""Real worker processes (prefork, 2 processes) against real Redis and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_causal.sql_store import SQLStore
from tests.helpers import truncate, wait_for

ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.env, self.log_path, self.name = env, log_path, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.acceptance.causal_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-l",
                "info",
                "-n",
                f"{self.name}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def acceptance_env(pg_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CAUSAL_STORE_URL=pg_url,
        CAUSAL_TEST_REDIS_URL=redis_url,
        CAUSAL_TEST_PREFIX=key_prefix,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


@pytest.fixture(scope="session")
def causal_app(acceptance_env: dict[str, str]) -> Any:
    """The acceptance app in this (producer) process, pointed at this run's services."""
    for key in ("CAUSAL_STORE_URL", "CAUSAL_TEST_REDIS_URL", "CAUSAL_TEST_PREFIX"):
        os.environ[key] = acceptance_env[key]
    from tests.acceptance import causal_app as module

    return module


@pytest.fixture(scope="session")
def worker(
    acceptance_env: dict[str, str], causal_app: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = WorkerProcess(acceptance_env, log, f"acc-{uuid.uuid4().hex[:6]}")
    proc.start()
    try:
        result = causal_app.ping.delay()
        try:
            assert result.get(timeout=60) == "pong"
        except Exception:
            print(proc.log_text())
            raise
        yield proc
    finally:
        proc.stop()
        if os.environ.get("CAUSAL_TEST_SHOW_WORKER_LOG"):
            print(proc.log_text())


@pytest.fixture
def store(pg_url: str) -> Iterator[SQLStore]:
    sql = SQLStore(pg_url)
    yield sql
    truncate(sql)
    sql.close()


class Log:
    """The order in which bodies ran, read back from Redis."""

    def __init__(self, client: redis.Redis, key_prefix: str, name: str) -> None:
        self.client, self.name, self.key = client, name, key_prefix + name

    def entries(self) -> list[str]:
        return [e.decode() for e in self.client.lrange(self.key, 0, -1)]

    def wait_len(self, n: int, timeout: float = 120) -> list[str]:
        wait_for(lambda: self.client.llen(self.key) >= n, timeout, f"{n} entries in {self.name}")
        return self.entries()


@pytest.fixture
def log(redis_url: str, key_prefix: str, request: pytest.FixtureRequest) -> Log:
    return Log(redis.Redis.from_url(redis_url), key_prefix, f"log-{uuid.uuid4().hex[:8]}")
