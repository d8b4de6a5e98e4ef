"""Real worker processes (prefork, 2 processes unless a test picks another pool) against
real PostgreSQL and a real broker: Redis, and RabbitMQ for tests marked ``brokers``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_causal.sql import SQLStore, open_store
from tests.acceptance.brokers import fresh_vhost, messages_held
from tests.conftest import fresh_database
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


class CeleryProcess:
    """``celery -A tests.acceptance.causal_app <args>`` as a subprocess, logging to a file.

    ``launcher`` is a command that runs it, such as ``("ip", "netns", "exec", name)`` to
    start it in a network namespace; it must leave it in its process group, the group
    :meth:`kill` and :meth:`stop` signal.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        args: list[str],
        launcher: tuple[str, ...] = (),
    ) -> None:
        self.env, self.log_path, self.args, self.launcher = env, log_path, args, launcher
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.launcher,
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tests.acceptance.causal_app",
                    *self.args,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its pool children."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


#: Concurrency of each pool in the tests: prefork and threads as two processes would be;
#: gevent with more greenlets than the store keeps connections, so some wait for one.
CONCURRENCY = {"prefork": 2, "threads": 4, "solo": 1, "gevent": 20}


class WorkerProcess(CeleryProcess):
    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        name: str,
        extra: tuple[str, ...] = (),
        pool: str = "prefork",
        launcher: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            env,
            log_path,
            [
                "worker",
                "-P",
                pool,
                "-c",
                str(CONCURRENCY[pool]),
                "-l",
                "info",
                "-n",
                f"{name}@%h",
                "--without-mingle",
                "--without-gossip",
                *extra,
            ],
            launcher,
        )

        self.nodename = f"{name}@{socket.gethostname()}"

    def pool_pids(self) -> list[int]:
        import psutil

        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that reaches a broker runs on Redis; one marked ``brokers`` on each named.

    All of them are parametrised (so their ids name the broker): session fixtures are then
    set up once per broker, not again each time a test of the other broker comes between.
    """
    if "broker" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("brokers")
        names = marker.args if marker else ("redis",)
        metafunc.parametrize("broker", names, indirect=True, scope="session")


AMQP_ADMIN_URL = os.environ.get("CAUSAL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ vhost of this run (override the node with CAUSAL_TEST_AMQP_URL)."""
    with fresh_vhost(AMQP_ADMIN_URL) as url:
        yield url


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> str:
    """The broker's URL: "redis" or "rabbitmq", as parametrised by pytest_generate_tests."""
    if request.param == "rabbitmq":
        return str(request.getfixturevalue("amqp_url"))
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture(scope="session")
def acceptance_env(pg_url: str, redis_url: str, broker: str, key_prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CAUSAL_STORE_URL=pg_url,
        CAUSAL_TEST_REDIS_URL=redis_url,
        CAUSAL_TEST_BROKER_URL=broker,
        CAUSAL_TEST_PREFIX=key_prefix,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


@pytest.fixture(scope="session")
def causal_app(acceptance_env: dict[str, str]) -> Any:
    """The acceptance app on the producer side, pointed at this run's services."""
    from tests.acceptance import causal_app as module

    return module.create(
        acceptance_env["CAUSAL_TEST_PREFIX"],
        store_url=acceptance_env["CAUSAL_STORE_URL"],
        broker_url=acceptance_env["CAUSAL_TEST_BROKER_URL"],
    )


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


def recorded(redis_url: str, prefix: str, what: str) -> list[str]:
    """Task ids the workers' hooks recorded (causal_app): "started", "retried", "parked"
    or "skipped", one entry per occurrence, across processes."""
    client = redis.Redis.from_url(redis_url)
    try:
        return [e.decode() for e in client.lrange(prefix + what, 0, -1)]
    finally:
        client.close()


def retried(redis_url: str, prefix: str) -> list[str]:
    return recorded(redis_url, prefix, "retried")


@dataclass
class Spawned:
    """A worker of a test's own, with its own database, key prefix and producer app."""

    worker: WorkerProcess
    handle: Any
    store: SQLStore
    env: dict[str, str]
    log_dir: Path

    def log(self, name: str) -> Log:
        return Log(
            redis.Redis.from_url(self.env["CAUSAL_TEST_REDIS_URL"]), self.handle.prefix, name
        )

    def retried(self) -> list[str]:
        """Ids of the tasks Celery retried, once per retry (causal_app's task_retry hook)."""
        return retried(self.env["CAUSAL_TEST_REDIS_URL"], self.handle.prefix)

    def messages_held(self, queue: str | None = None) -> int:
        """Messages the broker holds for ``queue`` (the default one), queued or unacked."""
        return messages_held(
            self.env["CAUSAL_TEST_BROKER_URL"],
            self.handle.prefix,
            queue or self.handle.routing.default,
        )

    def wait_ready(self) -> None:
        try:
            assert self.handle.ping.delay().get(timeout=60) == "pong"
        except Exception:
            print(self.worker.log_text())
            raise


@pytest.fixture
def spawn(
    acceptance_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Spawned]]:
    """Start a worker with settings of the test's own: ``spawn(CAUSAL_LOOKBACK="2")``."""
    from tests.acceptance import causal_app as module

    cleanup = ExitStack()

    def start(*worker_args: str, pool: str = "prefork", **overrides: str) -> Spawned:
        suffix = uuid.uuid4().hex[:6]
        db_url = cleanup.enter_context(fresh_database(f"_{suffix}"))
        prefix = f"{acceptance_env['CAUSAL_TEST_PREFIX']}{suffix}:"
        env = dict(acceptance_env, CAUSAL_STORE_URL=db_url, CAUSAL_TEST_PREFIX=prefix, **overrides)
        for key, value in overrides.items():  # the producer's app sees the same settings
            monkeypatch.setenv(key, value)
        handle = module.create(
            prefix, store_url=db_url, broker_url=acceptance_env["CAUSAL_TEST_BROKER_URL"]
        )
        store = open_store(db_url)
        cleanup.callback(store.close)
        worker = WorkerProcess(
            env, tmp_path / f"worker-{suffix}.log", f"w{suffix}", tuple(worker_args), pool
        )
        worker.start()
        cleanup.callback(worker.stop)
        spawned = Spawned(worker, handle, store, env, tmp_path)
        spawned.wait_ready()
        return spawned

    with cleanup:
        yield start
