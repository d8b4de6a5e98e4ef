"""The RQ job of W8: the bench tasks' body (one Redis ``INCR`` of the run's counter)."""

from __future__ import annotations

import os

import redis

_redis = redis.Redis.from_url(os.environ.get("CAUSAL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


def step(counter: str) -> None:
    _redis.incr(counter)
