"""A causal worker in a thread of the test process, and what waits in its store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.contrib.testing.worker import start_worker

from ..registry import runtime_for
from ..store import FollowerInfo

#: The in-memory transport polls for messages once a second by default: too slow for a
#: test that waits for a release.
_MEMORY_POLLING = {"polling_interval": 0.02}


@contextmanager
def start_causal_worker(app: Any, **options: Any) -> Iterator[Any]:
    """Run a worker for ``app`` (``celery_causal.install`` called on it) in a thread.

    Start it after the tasks are defined: the worker reads the app's tasks as it starts.
    ``options`` go to :func:`celery.contrib.testing.worker.start_worker` (solo pool and
    no ping task unless given).
    """
    runtime_for(app)  # fails now, naming the app, if install() was not called
    if str(app.conf.broker_url).startswith("memory://") and not app.conf.broker_transport_options:
        app.conf.broker_transport_options = dict(_MEMORY_POLLING)
    options.setdefault("pool", "solo")
    options.setdefault("perform_ping_check", False)
    with start_worker(app, **options) as worker:
        yield worker


def parked(app: Any, *, scope: str | None = None, limit: int = 1000) -> list[FollowerInfo]:
    """The followers parked in ``app``'s store, oldest first."""
    return runtime_for(app).store.list_followers(scope, None, limit)
