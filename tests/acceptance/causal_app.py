"""The Celery app the acceptance tests run in real worker processes.

Configured from the environment the test fixtures set, so each test run uses its own
database and Redis key prefix.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

import celery_causal

PREFIX = os.environ.get("CAUSAL_TEST_PREFIX", "causal-test-local:")
REDIS_URL = os.environ.get("CAUSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("causal_acceptance", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    causal_store_url=os.environ.get("CAUSAL_STORE_URL"),
    causal_lookback=float(os.environ.get("CAUSAL_LOOKBACK", 900)),
    causal_seen_ttl=float(os.environ.get("CAUSAL_SEEN_TTL", 1800)),
    causal_release_timeout=float(os.environ.get("CAUSAL_RELEASE_TIMEOUT", 60)),
    causal_sweep_interval=float(os.environ.get("CAUSAL_SWEEP_INTERVAL", 30)),
)
celery_causal.install(app)

_redis = redis.Redis.from_url(REDIS_URL)


@celery_causal.causal_task(app, name="acc.step", scope="acc")
def step(log: str, label: str) -> str:
    """Append ``label`` to the Redis list ``log``: the order bodies ran, across processes."""
    _redis.rpush(PREFIX + log, label)
    return label


@celery_causal.causal_task(app, name="acc.other_scope_step", scope="acc-other")
def other_scope_step(log: str, label: str) -> str:
    _redis.rpush(PREFIX + log, label)
    return label


@app.task(name="acc.ping")
def ping() -> str:
    return "pong"
