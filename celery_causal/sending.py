"""What ``install(app)`` checks when a producer sends a task with ``follows=`` or
``ordering_key=``.

Only a causal task can wait for a leader. A plain task given ``follows=`` would run at once
(Celery passes unknown options on as message properties, which nothing reads), so a
producer that forgot ``base=CausalTask`` would lose its ordering without a word. The check
sits in ``app.send_task``: every publish goes through it (``apply_async``, signatures,
canvas, ``send_task`` itself), and it is the one place a send can be refused, since Celery
logs and swallows what a ``before_task_publish`` handler raises.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from celery.utils import uuid

from .errors import NotCausalError
from .payload import FOLLOWS, PUBLISHED_AT


def guard_send_task(app: Any, causal_base: type) -> None:
    """Make ``app.send_task`` refuse ``follows=`` for a task that is not causal.

    ``CausalTask.apply_async`` turns ``follows`` into a header before it calls
    ``send_task``, so a ``follows`` that reaches it comes from a plain task's
    ``apply_async`` (``task_type`` is that task) or from ``send_task`` itself. There, a
    causal task this app knows gets its header, as ``apply_async`` would set it.
    """
    send_task = app.send_task

    @functools.wraps(send_task)
    def checked_send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        follows = options.pop("follows", None)
        key = options.pop("ordering_key", None)
        if follows is not None or key is not None:
            task = options.get("task_type") or app.tasks.get(name)
            if not isinstance(task, causal_base):
                wait = f"follows={follows!r}" if key is None else f"ordering_key={key!r}"
                raise NotCausalError(
                    f"task {name} is not a causal task, so it cannot wait for {wait}; "
                    "declare it with @celery_causal.causal_task(app) or "
                    "base=celery_causal.CausalTask"
                    + ("" if task is not None else " (no task of that name in this app)")
                )
            headers = dict(options.pop("headers", None) or {})
            if key is not None:
                options["task_id"] = options.get("task_id") or uuid()
                task._send_under_key(key, options["task_id"], headers, follows)  # type: ignore[attr-defined]
            else:
                headers[FOLLOWS] = task._follows_header(follows)  # type: ignore[attr-defined]
            headers.setdefault(PUBLISHED_AT, time.time())
            options["headers"] = headers
        return send_task(name, args, kwargs, **options)

    app.send_task = checked_send_task
