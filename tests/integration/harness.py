"""An app with two causal tasks that record the order their bodies ran in, and a worker
in a thread (solo pool, in-memory broker): arrival order is exactly send order."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

import celery_causal
from celery_causal.store import CausalStore
from celery_causal.testing import start_causal_worker
from tests.helpers import wait_for


class Harness:
    def __init__(self, store: CausalStore, **conf: Any) -> None:
        self.app = Celery(f"inproc{id(self)}", broker="memory://", backend="cache+memory://")
        self.app.conf.update(worker_hijack_root_logger=False, **conf)  # keep pytest's logs
        celery_causal.install(self.app, store=store, beat=False)
        self.store = store
        self.ran: list[str] = []
        # Task ids are unique per harness: results of earlier tests (the in-memory result
        # backend is shared by the whole process) must not answer this test's AsyncResults.
        self.tag = uuid.uuid4().hex[:8]

        @celery_causal.causal_task(self.app, name="tests.event", scope="events", shared=False)
        def event(label: str) -> str:
            self.ran.append(label)
            return label

        @celery_causal.causal_task(self.app, name="tests.other", scope="other", shared=False)
        def other(label: str) -> str:
            self.ran.append(label)
            return label

        self.event, self.other = event, other

    def send(
        self,
        label: str,
        follows: str | None = None,
        *,
        task: Any = None,
        occurred: float | None = None,
    ) -> Any:
        headers = {"causal_published_at": occurred} if occurred is not None else None
        return (task or self.event).apply_async(
            (label,),
            task_id=self.id(label),
            follows=follows and self.id(follows),
            headers=headers,
        )

    def id(self, label: str) -> str:
        return f"{self.tag}-{label}"

    @contextmanager
    def worker(self) -> Iterator[None]:
        with start_causal_worker(self.app, shutdown_timeout=30):
            yield

    def run_until(self, condition: Callable[[], bool], what: str) -> None:
        with self.worker():
            wait_for(condition, 30, what)
