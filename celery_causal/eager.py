"""Causal order where Celery runs tasks in the calling process (``task_always_eager``).

An eagerly applied follower is checked as a delivered one is: if its leader has not
succeeded it is parked (its ``EagerResult`` is ``DEFERRED``), and it runs when its leader is
applied and succeeds, in the same process. Released followers are applied one after the
other from a queue kept per thread, never nested inside their leader's call, so a long
chain cannot exhaust the stack.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any

from . import signals
from .errors import PayloadError
from .payload import DEPTH, RELEASED, unpack
from .release import bury_unreadable
from .store import CausalStore, ClaimedFollower

#: Per thread: the released followers waiting to be applied, while a drain is under way.
_local = threading.local()


def apply_released(
    app: Any,
    store: CausalStore,
    claimed: Sequence[ClaimedFollower],
    *,
    reason: str,
    depth: int,
    accept: Collection[str],
) -> list[str]:
    """Apply claimed followers in this process, in order; return the ids applied.

    Each row is deleted once its follower was handed to Celery's eager tracer, as a
    published row is once the broker holds its message.
    """
    calls: list[Callable[[], object]] = []
    applied: list[str] = []
    rows: list[ClaimedFollower] = []
    for follower in claimed:
        try:
            message = unpack(follower, accept)
            args, kwargs, embed = message.decoded_body(accept)
        except (PayloadError, TypeError, ValueError) as exc:
            bury_unreadable(store, follower, exc)
            continue
        options = {
            "task_id": follower.follower_id,
            "headers": {**message.headers, RELEASED: reason, DEPTH: depth},
            "link": (embed or {}).get("callbacks"),
            "link_error": (embed or {}).get("errbacks"),
            "throw": False,  # a follower's failure is its own, not its leader's
        }
        task = app.tasks[follower.task_name]
        calls.append(functools.partial(task.apply, args, kwargs, **options))
        applied.append(follower.follower_id)
        rows.append(follower)
    store.finish(rows)
    for follower in claimed:
        if follower.follower_id in applied:
            signals.follower_released.send(
                sender=None,
                task_id=follower.follower_id,
                leader_id=follower.leader_id,
                scope=follower.scope,
                released_by=reason,
            )
    for call in calls:
        _enqueue(call)
    return applied


def _enqueue(call: Callable[[], object]) -> None:
    pending: deque[Callable[[], object]] | None = getattr(_local, "pending", None)
    if pending is not None:
        pending.append(call)  # the outermost drain of this thread applies it
        return
    pending = _local.pending = deque([call])
    try:
        while pending:
            pending.popleft()()
    finally:
        _local.pending = None
