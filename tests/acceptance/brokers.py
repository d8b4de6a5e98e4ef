"""The brokers the acceptance suite runs on: Redis for every test, RabbitMQ for those marked.

A test marked ``@pytest.mark.brokers("redis", "rabbitmq")`` runs once per broker (its
``broker`` fixture is parametrised by ``pytest_generate_tests`` in conftest.py); an unmarked
one runs on Redis. The result backend is Redis either way.

Each test run has a RabbitMQ virtual host of its own, created with ``rabbitmqctl`` and
deleted at the end with every queue and exchange declared in it; within it, each worker a
test starts consumes queues named with its own prefix (as on Redis, where the prefix is a
key prefix), so a message a test left behind never reaches another test's worker.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import redis

from tests.conftest import RUN_ID, service_missing

BROKERS = ("redis", "rabbitmq")
#: Both, for tests of what a broker does with a message (ordering, parking, releases).
every_broker = pytest.mark.brokers(*BROKERS)


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "pyamqp://"))


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "--quiet", *args], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _on_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


@contextmanager
def fresh_vhost(admin_url: str) -> Iterator[str]:
    """A virtual host of this run on the local RabbitMQ node; yield its broker URL.

    Deleting the vhost afterwards deletes every queue and exchange the run declared.
    """
    from kombu import Connection

    vhost = f"causal-test-{RUN_ID}"
    user = urlsplit(admin_url).username or "guest"
    try:
        if shutil.which("rabbitmqctl") is None:
            raise RuntimeError("rabbitmqctl is not on PATH (it creates a vhost per run)")
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        url = _on_vhost(admin_url, vhost)
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        service_missing("RabbitMQ", exc)
    try:
        yield url
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def rabbitmq_queues(url: str, *columns: str) -> dict[str, list[str]]:
    """``rabbitmqctl list_queues`` of ``url``'s vhost: each queue's ``columns``."""
    vhost = urlsplit(url).path.lstrip("/") or "/"
    out = _rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name", *columns)
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def messages_held(broker_url: str, prefix: str, queue: str) -> int:
    """Messages the broker holds for ``queue``, queued or delivered and not yet acked.

    Once this is 0 with acks_late, no body can run again from a message already sent.
    """
    if is_amqp(broker_url):
        return int(rabbitmq_queues(broker_url, "messages").get(queue, ["0"])[0])
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(f"{prefix}{queue}")) + int(client.hlen(f"{prefix}unacked"))
    finally:
        client.close()
