"""The benchmark's Celery app: the same trivial body as a plain task and as a causal task.

Configured from the environment the benchmark sets (own database, own Redis key prefix).
Bodies count completions in Redis, so no result backend is needed; with
``CAUSAL_BENCH_RESULTS=1`` (W1r) results go to a Redis result backend all the same, as
most deployments have one.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

import celery_causal

REDIS_URL = os.environ.get("CAUSAL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CAUSAL_BENCH_PREFIX", "causal-bench:")
COUNTER = PREFIX + "done"
RESULTS = os.environ.get("CAUSAL_BENCH_RESULTS") == "1"

app = Celery("causal_bench", broker=REDIS_URL, backend=REDIS_URL if RESULTS else None)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    result_expires=600,
    broker_connection_retry_on_startup=True,
    task_ignore_result=not RESULTS,
    worker_prefetch_multiplier=16,
    causal_store_url=os.environ.get("CAUSAL_STORE_URL"),
    causal_deduplicate=os.environ.get("CAUSAL_DEDUPLICATE", "always"),
)
if "CAUSAL_LOCAL_HOLD" in os.environ:
    app.conf.causal_local_hold = float(os.environ["CAUSAL_LOCAL_HOLD"])
celery_causal.install(app, beat=False)
_redis = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.plain")
def plain(i: int) -> None:
    _redis.incr(COUNTER)


@celery_causal.causal_task(app, name="bench.causal", scope="bench")
def causal(i: int) -> None:
    _redis.incr(COUNTER)


@celery_causal.causal_task(app, name="bench.soak_step", scope="soak")
def soak_step(log: str, label: str) -> None:
    """Record the order bodies ran in, across processes (the soak test)."""
    _redis.rpush(PREFIX + log, label)
