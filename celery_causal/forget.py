"""Forgetting a parked follower: it never runs, and ends ``REVOKED`` as a revoked task does.

Its producer may be waiting on ``AsyncResult.get()`` and a monitor shows it ``DEFERRED``:
both must learn that it will not run. Celery's worker, revoking a task, stores ``REVOKED``
with a ``TaskRevokedError`` through the task's result backend (which also counts it as a
finished part of the chord it belongs to) and sends a ``task-revoked`` event; forgetting
does the same, from the stored message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.task import Context

from .errors import PayloadError
from .payload import unpack
from .runtime import CausalRuntime
from .store import Follower

logger = logging.getLogger("celery_causal")

REASON = "forgotten by an operator (celery causal forget): it will not run"


def forget(runtime: CausalRuntime, scope: str, follower_id: str) -> Follower | None:
    """Drop a parked follower without running it; return it, or ``None`` if not parked.

    The row is deleted first: once it is gone no release can publish it, so the REVOKED
    state stored next is final. A failure to store that state or send the event is logged
    and does not bring the row back.
    """
    forgotten = runtime.store.forget(scope, follower_id)
    if forgotten is None:
        return None
    request = _request(runtime, forgotten)
    task = runtime.app.tasks.get(forgotten.task_name)
    backend = task.backend if task is not None else runtime.app.backend
    try:
        if request is None or not request.ignore_result:
            backend.mark_as_revoked(follower_id, REASON, request=request)
    except Exception as exc:
        logger.warning("forgot follower %s but could not store it as REVOKED: %r", follower_id, exc)
    _send_revoked(runtime.app, follower_id, forgotten.hostname)
    logger.info(
        "forgot follower %s (follows %s, scope %r)", follower_id, forgotten.leader_id, scope
    )
    return forgotten


def _request(runtime: CausalRuntime, follower: Follower) -> Any:
    """The request the follower's worker would have: what the result backend reads (its
    task, group, chord, ignore_result); ``None`` if the stored message cannot be read."""
    try:
        message = unpack(follower, runtime.accept)
        args, kwargs, embed = message.decoded_body(runtime.accept)
    except (PayloadError, TypeError, ValueError) as exc:
        logger.warning(
            "forgetting follower %s: its message is unreadable: %s", follower.follower_id, exc
        )
        return None
    return Context({**message.headers, **(embed or {})}, args=args, kwargs=kwargs)


def _send_revoked(app: Any, task_id: str, hostname: str) -> None:
    """Send ``task-revoked`` on behalf of the worker that parked the task (``hostname``),
    so monitors such as Flower see no worker that does not exist. Sent whatever the
    workers' event switch: an operator's command has no ``-E`` of its own."""
    try:
        with app.events.default_dispatcher(hostname=hostname or None) as dispatcher:
            dispatcher.send(
                "task-revoked", uuid=task_id, terminated=False, signum=None, expired=False
            )
    except Exception as exc:  # monitoring must never undo the operator's decision
        logger.warning("could not send task-revoked for task %s: %r", task_id, exc)
