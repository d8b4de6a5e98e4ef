"""Celery's tracer with the causal check before it and the record of the outcome after it.

Celery's worker gives every task its tracer by assigning ``task.__trace__`` (in each prefork
pool process; in the consumer for the other pools). :class:`~celery_causal.task.CausalTask`
wraps what is assigned with :func:`check_then_trace`:

- before the tracer, the causal check: a task that must not run (parked, or a duplicate)
  ends there, without raising Ignore through the tracer, whose exception info would copy
  the code positions of every frame on the way (about 0.5 ms a parked task, held in
  reference cycles until a full collection);
- after the tracer, the record of the task's outcome and the release of its followers:
  by then Celery stored the result and ran ``on_success``, ``after_return`` and the
  ``task_success`` / ``task_postrun`` handlers, so a follower that reads its leader's result,
  or relies on a commit made in a post-run hook, finds it.

It relies on these Celery internals, checked by CI against the oldest Celery the package
admits (5.5.0) and the newest 5.x (5.7 today): ``trace_ok_t`` (what a tracer returns:
retval, info, runtime, retstr; ``info`` is None on success, a ``TraceInfo`` with the state
otherwise), ``TraceInfo`` and ``ExceptionInfo``, and a worker request class of the task's
own (``Task.Request``, a documented hook) whose ``on_failure`` sees a parked delivery.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.app.task import Context
from celery.app.trace import TraceInfo, trace_ok_t
from celery.app.trace import logger as trace_logger
from celery.exceptions import Ignore
from celery.states import FAILURE, IGNORED
from celery.worker.request import Request

from .core import DEFERRED, LEADER, Arrival
from .errors import InvalidIdError, InvalidMessageError, LeaderFailed, StoreUnavailable
from .payload import (
    DEPTH,
    FIRST_PARKED,
    FOLLOWS,
    KEY,
    PUBLISHED_AT,
    RELEASED,
    RELEASED_BY,
    SEEN,
    check_id,
)
from .runtime import CausalRuntime

logger = logging.getLogger("celery_causal")

#: The check made before Celery's tracer, for the task the tracer is running in this
#: thread: (task id, what it found). What it found is True (the body may run), None (check
#: again inside the tracer, where a failure is recorded), or the exception the task must
#: end with inside the tracer (StoreUnavailable: a retry; LeaderFailed: a failure). Kept
#: out of the request, whose fields a retry copies into the new message.
pre_checked = threading.local()

RELEASE_FAILED = "its followers could not all be released; the sweep releases the rest"

#: Attempts (0.5 s, 1 s, 2 s, ... apart) at recording a finished task while the store is away.
_AFTER_BODY_ATTEMPTS = 5
#: Most ids a header may list (the largest ``causal_max_leaders`` allowed).
_MAX_HEADER_IDS = 10_000


def _header(request: Any, name: str) -> Any:
    headers = request.headers or {}
    if name in headers:
        return headers[name]
    return getattr(request, name, None)


def arrival_from(request: Any) -> tuple[Arrival, int]:
    """The ordering facts a delivered message carries, and its release depth.

    Any producer can send a causal task (``send_task``, another language's client), so each
    header is checked as strictly as ``apply_async`` checks what it sends: a value that does
    not fit raises :class:`InvalidMessageError` naming the header, and the task fails.
    """
    task_id = _id_or_none(request.id, "task id", request.id)
    if task_id is None:
        raise InvalidMessageError("a causal task message without a task id")
    leaders = _ids(_header(request, FOLLOWS), FOLLOWS, task_id)
    seen = _ids(_header(request, SEEN), SEEN, task_id)
    released = _id_or_none(_header(request, RELEASED), f"header {RELEASED}", task_id)
    released_by = _id_or_none(_header(request, RELEASED_BY), f"header {RELEASED_BY}", task_id)
    if released == LEADER and released_by is not None:
        seen += (released_by,)
    key = _id_or_none(_header(request, KEY), f"header {KEY}", task_id)
    published_at = _header(request, PUBLISHED_AT)
    if published_at is not None and not _is_real(published_at):
        raise _invalid(task_id, PUBLISHED_AT, "must be a time in epoch seconds", published_at)
    first_parked = _header(request, FIRST_PARKED)
    if first_parked is not None and not _is_real(first_parked):
        raise _invalid(task_id, FIRST_PARKED, "must be a time in epoch seconds", first_parked)
    depth = _header(request, DEPTH)
    if depth is not None and not (isinstance(depth, int) and _is_real(depth) and depth >= 0):
        raise _invalid(task_id, DEPTH, "must be an integer of at least 0", depth)
    delivery_info = request.delivery_info or {}
    arrival = Arrival(
        task_id=task_id,
        follows=leaders[0] if leaders else None,
        more=leaders[1:],
        seen=seen,
        released=released or "",
        released_by=released_by,
        first_parked_at=float(first_parked) if first_parked is not None else None,
        published_at=float(published_at) if published_at is not None else None,
        redelivered=bool(delivery_info.get("redelivered")),
        key=key,
    )
    return arrival, depth or 0


def _ids(value: object, header: str, task_id: str) -> tuple[str, ...]:
    """A header that holds one task id or a list of them, as a tuple of ids."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (_id_or_none(value, f"header {header}", task_id) or "",)
    if (
        not isinstance(value, list)
        or len(value) > _MAX_HEADER_IDS
        or not all(isinstance(item, str) for item in value)
    ):
        raise _invalid(
            task_id, header, f"must be a task id or a list of at most {_MAX_HEADER_IDS}", value
        )
    return tuple(_id_or_none(item, f"header {header}", task_id) or "" for item in value)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _id_or_none(value: object, what: str, task_id: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(task_id, what, "must be a string", value)
    try:
        return check_id(value, what)
    except InvalidIdError as exc:
        raise InvalidMessageError(f"task {_short(task_id)}: {exc}") from None


def _invalid(task_id: object, what: str, rule: str, value: object) -> InvalidMessageError:
    if not what.startswith(("header", "task id")):
        what = f"header {what}"
    return InvalidMessageError(
        f"task {_short(task_id)}: {what} {rule}, not {type(value).__name__} {_short(value)}"
    )


def _short(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_then_trace(
    task: Any, tracer: Any, uuid: str, args: Any, kwargs: Any, request: Any = None
) -> Any:
    """Celery's tracer between the causal check and the record of the task's outcome.

    A parked or duplicate task ends before the tracer. A task that runs has its outcome
    recorded (and its followers released) only after the tracer returns: by then Celery
    stored its SUCCESS, ran ``on_success``, ``after_return`` and the ``task_success`` and
    ``task_postrun`` handlers, so a follower that reads its leader's result, or relies on a
    commit made in a post-run hook, finds it.
    """
    request = request if request is not None else {}
    started = time.monotonic()
    context = Context(request, args=args, called_directly=False, kwargs=kwargs)
    task.request_stack.push(context)  # as the tracer does: task.request is this context
    runtime: CausalRuntime = task.causal_runtime()
    checked: bool | BaseException | None
    depth = 0
    key = None
    try:
        arrival, depth = arrival_from(context)
        key = arrival.key
        runs = task._may_run(runtime, task.scope, arrival, depth, context)
        checked = runs
    except (StoreUnavailable, LeaderFailed) as exc:
        runs, checked = True, exc  # raised by __call__ inside the tracer
    except Exception:
        # Any other failure is reported by the tracer: __call__ checks again and raises
        # it there, where Celery records the task's failure. Parking is idempotent.
        runs, checked = True, None
    finally:
        task.request_stack.pop()
    if not runs:
        return _ignored(task, context, time.monotonic() - started)
    pre_checked.note = (uuid, checked)
    try:
        traced = tracer(uuid, args, kwargs, request)
    finally:
        pre_checked.note = None
    retval, info = traced[0], traced[1]
    if info is None and not isinstance(retval, ExceptionInfo):
        record_outcome(runtime, task.scope, context.id, depth, failed=False, key=key)
    elif info is not None and info.state == FAILURE:
        record_outcome(runtime, task.scope, context.id, depth, failed=True, key=key)
    return traced


def leader_failed_error(arrival: Arrival, scope: str, leader: str | None = None) -> LeaderFailed:
    return LeaderFailed(
        f"task {arrival.task_id} was not run: the task it follows, {leader or arrival.leader} "
        f"(scope {scope!r}), failed (causal_on_leader_failure='fail')"
    )


def record_outcome(
    runtime: CausalRuntime,
    scope: str,
    task_id: str,
    depth: int,
    *,
    failed: bool,
    key: str | None = None,
) -> None:
    """After a task ran: record its outcome and release (or fail) its followers; then
    free its ordering key, unless a failure holds the key (see ``CausalRuntime.free_key``)."""
    _record_outcome(runtime, scope, task_id, depth, failed=failed)
    if key is not None:
        # After the record: a send that still finds this task as the key's newest follows
        # it and meets its outcome; one that finds the key free follows nothing.
        _after_body(
            "its ordering key could not be freed",
            functools.partial(runtime.free_key, scope, key, task_id, failed=failed),
            task_id,
            scope,
        )


def _record_outcome(
    runtime: CausalRuntime, scope: str, task_id: str, depth: int, *, failed: bool
) -> None:
    if failed:
        _after_body(
            "its followers could not be handled after its failure",
            functools.partial(runtime.leader_failed, scope, task_id, depth),
            task_id,
            scope,
        )
    else:
        _after_body(
            RELEASE_FAILED,
            functools.partial(runtime.complete, scope, task_id, depth),
            task_id,
            scope,
        )


class Parked(Ignore):  # type: ignore[misc]
    """A delivery that was parked: the fields of its ``task-deferred`` event."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__(fields)  # args: what pickling rebuilds it from
        self.fields = fields or {}


class CausalRequest(Request):  # type: ignore[misc]
    """A causal task's request in the worker's main process.

    A parked task's ``task-deferred`` event is sent from here, through the consumer's own
    event dispatcher: it follows the worker's current event switch (``-E``, or events
    enabled remotely, as Flower does) and carries the worker's name, as ``task-started``
    and ``task-succeeded`` do. A pool process started before events were switched on could
    not know of them.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, Parked):
            self.send_event("task-deferred", **exc.fields)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )


class _NotRun(ExceptionInfo):  # type: ignore[misc]
    """The exception info of a delivery that must not run: an Ignore, without a traceback.

    The worker's main process reads only its ``exception`` (an Ignore: it acks the
    message; a :class:`Parked`: it also sends ``task-deferred``). Celery's own would format
    a traceback, and Python 3.11 parses each frame's source line to place its carets: a
    large part of a pool process's CPU when most deliveries park. Pickled to the main
    process, which imports this module with the app.
    """

    def __init__(self, exception: Ignore) -> None:  # no super().__init__: it formats sys.exc_info()
        self.type, self.tb, self.traceback, self.internal = type(exception), None, "", True
        self.exception = ExceptionWithTraceback(exception, "")


def _ignored(task: Any, context: Any, runtime: float) -> Any:
    """The outcome the tracer gives a task that raised Ignore.

    A duplicate also gets the tracer's "Task ... ignored" line. A parked task does not:
    "ignored" reads as "dropped", and its own "parked task ..." line says what happened.
    """
    parked = getattr(context, "causal_held", None) == DEFERRED
    if not parked and trace_logger.isEnabledFor(logging.INFO):
        trace_logger.info("Task %s[%s] ignored", task.name, context.id)
    exception = Parked(context.causal_deferred) if parked else Ignore()
    return trace_ok_t(_NotRun(exception), TraceInfo(IGNORED, exception), runtime, None)


def _after_body(problem: str, step: Callable[[], object], task_id: str, scope: str) -> None:
    """Run a step that follows the body, retrying while the store is unreachable.

    The body already ran, so the task is not retried through Celery (that would run it
    again); the steps are idempotent, so repeating them here is safe. If the store stays
    away, the sweep releases the followers after the lookback: late, never lost. Any other
    failure (the broker refusing a publish after kombu's own retries) is logged and leaves
    the body's outcome standing: claimed followers are republished by the sweep after
    ``causal_release_timeout``, waiting ones after the lookback.
    """
    delay = 0.5
    for attempt in range(_AFTER_BODY_ATTEMPTS):
        try:
            step()
            return
        except StoreUnavailable as exc:
            if attempt == _AFTER_BODY_ATTEMPTS - 1:
                logger.error("task %s (scope %r): %s: %s", task_id, scope, problem, exc)
                return
            time.sleep(delay)
            delay *= 2
        except Exception:
            logger.exception("task %s (scope %r): %s", task_id, scope, problem)
            return
