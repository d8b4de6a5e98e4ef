"""Drive a fan-in follower through the worker's own decision (CausalTask._may_run), with
the runtime's publishes captured as the messages a worker would receive."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery

import celery_causal
from celery_causal.payload import DEPTH, RELEASED, RELEASED_BY, unpack
from celery_causal.registry import runtime_for
from celery_causal.release import ReleaseReport
from celery_causal.store import CausalStore
from celery_causal.tracing import arrival_from

SCOPE = "default"


class Driver:
    def __init__(self, store: CausalStore, **conf: Any) -> None:
        self.store = store
        self.app = Celery(f"drv-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
        self.app.conf.update(causal_seen_cache_size=0, **conf)
        celery_causal.install(self.app, store=store, beat=False)

        @celery_causal.causal_task(self.app, name="drv.report", shared=False)
        def report() -> None: ...

        self.task = report
        self.runtime = runtime_for(self.app)
        #: Messages the runtime published (released followers), as headers.
        self.published: list[dict[str, Any]] = []
        self.runtime._publish = self._capture  # type: ignore[method-assign]

    def _capture(self, claimed: list[Any], *, reason: str, depth: int) -> ReleaseReport:
        for row in claimed:
            message = unpack(row, {"application/json"})
            self.published.append(
                {**message.headers, RELEASED: reason, DEPTH: depth, RELEASED_BY: row.leader_id}
            )
        self.store.finish(claimed)
        return ReleaseReport(published=[r.follower_id for r in claimed])

    def deliver(self, task_id: str, headers: dict[str, Any]) -> bool:
        """What a worker does with one delivery: True if the body would run."""
        context = self.task._eager_request(task_id, (), {}, headers, None, None, {})
        context.ignore_result = True
        arrival, depth = arrival_from(context)
        return self.task._may_run(self.runtime, SCOPE, arrival, depth, context)
