"""pytest fixtures for testing causal tasks, registered when celery-causal is installed.

They build on Celery's own ``celery_app`` fixture (and its ``celery_config``), which the
pytest-celery plugin provides::

    def test_capture_waits_for_the_order(causal_celery_app):
        @celery_causal.causal_task(causal_celery_app)
        def create(order_id): ...
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .testing import MemoryStore, start_causal_worker
from .wiring import install


@pytest.fixture
def causal_memory_store() -> MemoryStore:
    """An empty in-memory store."""
    return MemoryStore()


@pytest.fixture
def causal_celery_app(celery_app: Any, causal_memory_store: MemoryStore) -> Any:
    """Celery's ``celery_app`` (in-memory broker and results) with causal ordering
    installed on ``causal_memory_store``; no beat entry."""
    install(celery_app, store=causal_memory_store, beat=False)
    return celery_app


@pytest.fixture
def causal_celery_worker(causal_celery_app: Any) -> Iterator[Any]:
    """A worker for ``causal_celery_app`` in a thread. Tasks defined after it started
    need ``causal_celery_worker.reload()``; define them in a fixture it depends on, or
    use :func:`celery_causal.testing.start_causal_worker` inside the test."""
    with start_causal_worker(causal_celery_app) as worker:
        yield worker
