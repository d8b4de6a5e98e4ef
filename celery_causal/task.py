"""The causal task base class: ``follows=`` on sends, and the check a delivered task makes
before its body may run. The tracer interception is in ``tracing.py``; ``install`` and the
worker's start-up in ``wiring.py``."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from celery import Celery, Task
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry
from celery.result import EagerResult
from celery.states import FAILURE, IGNORED, SUCCESS
from celery.utils import uuid
from kombu.utils.functional import maybe_list

from . import signals
from .core import DEFERRED, Action, Arrival, Verdict, store_retry_countdown
from .errors import (
    InvalidIdError,
    InvalidLeaderError,
    LeaderFailed,
    ReleaseInProgress,
    StoreUnavailable,
)
from .payload import (
    FIRST_PARKED,
    FOLLOWS,
    KEY,
    PUBLISHED_AT,
    SEEN,
    SERIALIZER,
    check_id,
    follower_of,
    follows_header,
)
from .registry import runtime_for
from .runtime import CausalRuntime
from .settings import CausalSettings
from .store import ParkOutcome
from .tracing import (
    RELEASE_FAILED,
    Parked,
    arrival_from,
    check_then_trace,
    leader_failed_error,
    pre_checked,
    record_outcome,
)

logger = logging.getLogger("celery_causal")

#: Store-outage retries do not give up: the task waits for the database rather than
#: failing or running out of order.
_STORE_MAX_RETRIES = 10**9


class CausalTask(Task):  # type: ignore[misc]
    """Base class of causal tasks: ``@app.task(base=CausalTask)``.

    Send with ``follows=<leader task id or AsyncResult>``; the task then runs only after
    its leader succeeded, or once the sweep released it (it waited ``causal_lookback`` from
    its park for a leader that never came).
    """

    #: Followers and done records are isolated by scope; leader and follower share one.
    scope: str = "default"
    #: ``ordering_key(*args, **kwargs)``: the ordering key of every send of this task
    #: (``@causal_task(app, ordering_key=...)``), or ``None``.
    ordering_key: Callable[..., Any] | None = None
    #: Its request in the worker's main process sends ``task-deferred`` (tracing.py).
    Request = "celery_causal.tracing:CausalRequest"
    #: The worker's main process holds a follower whose leader runs in it (holding.py).
    Strategy = "celery_causal.holding:strategy"

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        follows: Any = None,
        ordering_key: str | None = None,
        **options: Any,
    ) -> Any:
        headers = dict(options.pop("headers", None) or {})
        if follows is not None:
            headers[FOLLOWS] = self._follows_header(follows)
        if task_id is not None:
            check_id(task_id, "task_id")
        if not isinstance(self.scope, str):
            raise InvalidIdError(f"scope of {self.name} must be a string, not {self.scope!r}")
        check_id(self.scope, f"scope of {self.name}")
        task_id = self._keyed(ordering_key, args, kwargs, task_id, headers, follows)
        # The event's occurrence time, which orders a leader's followers when they are
        # released; retries and re-enqueues keep it (setdefault).
        headers.setdefault(PUBLISHED_AT, time.time())
        if options.get("serializer"):
            headers[SERIALIZER] = options["serializer"]
        return super().apply_async(
            args,
            kwargs,
            task_id=task_id,
            producer=producer,
            link=link,
            link_error=link_error,
            shadow=shadow,
            headers=headers,
            **options,
        )

    def _follows_header(self, follows: object) -> str | list[str]:
        """The ``causal_follows`` header of ``follows``; several leaders are checked
        against the app's ``causal_max_leaders`` (read only then: one leader is the
        common case)."""
        header = follows_header(follows)
        if isinstance(header, list):
            follows_header(header, CausalSettings.from_conf(self.app.conf).max_leaders)
        return header

    def _keyed(
        self,
        ordering_key: str | None,
        args: Any,
        kwargs: Any,
        task_id: str | None,
        headers: dict[str, Any],
        follows: Any,
    ) -> str | None:
        """Record a send under its ordering key (given, or the task's), if it has one;
        return its task id (made here if the send had none)."""
        if KEY in headers:  # a retry or a resend carries its key and its place already
            return task_id
        key = ordering_key
        if key is None and self.ordering_key is not None:
            key = self.ordering_key(*(args or ()), **(kwargs or {}))
        if key is None:
            return task_id
        task_id = task_id or uuid()
        self._send_under_key(key, task_id, headers, follows)
        return task_id

    def _send_under_key(
        self, key: object, task_id: str, headers: dict[str, Any], follows: Any
    ) -> None:
        """Record ``task_id`` as the newest task of ordering key ``key`` (one store
        statement) and make it a follower of the task recorded before it."""
        if not isinstance(key, str):
            raise InvalidIdError(
                f"ordering_key of {self.name} must be a string, not {type(key).__name__}"
            )
        check_id(key, f"ordering_key of {self.name}")
        if follows is not None:
            raise InvalidLeaderError(
                f"{self.name} was sent with both follows= and ordering_key=: a task sent "
                "under a key follows the key's previous task; give one of them"
            )
        previous = runtime_for(self.app).record_key(self.scope, key, task_id)
        headers[KEY] = key
        if previous is not None:
            headers[FOLLOWS] = previous

    def apply(
        self,
        args: Any = None,
        kwargs: Any = None,
        link: Any = None,
        link_error: Any = None,
        task_id: str | None = None,
        retries: int | None = None,
        throw: bool | None = None,
        logfile: Any = None,
        loglevel: Any = None,
        headers: Any = None,
        follows: Any = None,
        ordering_key: str | None = None,
        **options: Any,
    ) -> Any:
        """Run the task here (``task_always_eager``, or ``.apply()``), in causal order.

        The same check as on a worker: a follower whose leader has not succeeded is parked
        and its result is ``DEFERRED``; it runs when its leader is applied here and
        succeeds (with ``task_always_eager``; otherwise its leader's release publishes it).
        A duplicate of a task recorded done is ``IGNORED``.
        """
        headers = dict(headers or {})
        if follows is not None:
            headers[FOLLOWS] = self._follows_header(follows)
        task_id = self._keyed(ordering_key, args, kwargs, task_id, headers, follows) or uuid()
        headers.setdefault(PUBLISHED_AT, time.time())
        runtime = runtime_for(self.app)
        scope = self.scope
        context = self._eager_request(task_id, args, kwargs, headers, link, link_error, options)
        arrival, depth = arrival_from(context)
        checked: bool | BaseException = True
        try:
            if not self._may_run(runtime, scope, arrival, depth, context):
                return EagerResult(task_id, None, context.causal_held, name=self.name)
        except LeaderFailed as exc:
            checked = exc  # raised by __call__ inside Celery's eager tracer
        pre_checked.note = (task_id, checked)
        try:
            result = super().apply(
                args,
                kwargs,
                link=link,
                link_error=link_error,
                task_id=task_id,
                retries=retries,
                throw=throw,
                logfile=logfile,
                loglevel=loglevel,
                headers=headers,
                **options,
            )
        except Exception:
            record_outcome(runtime, scope, task_id, depth, failed=True, key=arrival.key)
            raise  # propagated
        finally:
            pre_checked.note = None
        if result.state in (SUCCESS, FAILURE):
            failed = result.state == FAILURE
            record_outcome(runtime, scope, task_id, depth, failed=failed, key=arrival.key)
        return result

    def _eager_request(
        self,
        task_id: str,
        args: Any,
        kwargs: Any,
        headers: dict[str, Any],
        link: Any,
        link_error: Any,
        options: dict[str, Any],
    ) -> Context:
        """The request an eagerly applied task would have, for the causal check."""
        return Context(
            {
                "id": task_id,
                "task": self.name,
                "headers": headers,
                "callbacks": maybe_list(link),  # type: ignore[no-untyped-call]
                "errbacks": maybe_list(link_error),  # type: ignore[no-untyped-call]
                "ignore_result": options.get("ignore_result", self.ignore_result),
                "delivery_info": {"priority": options.get("priority")},
                "is_eager": True,
            },
            args=args or (),
            kwargs=kwargs or {},
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return super().__call__(*args, **kwargs)
        if request.is_eager:
            # Checked by apply() before Celery's eager tracer; the outcome is recorded there.
            note = getattr(pre_checked, "note", None)
            if note is not None and note[0] == request.id and isinstance(note[1], BaseException):
                raise note[1]
            return super().__call__(*args, **kwargs)
        runtime = runtime_for(self.app)
        arrival, depth = arrival_from(request)
        scope = self.scope
        note = getattr(pre_checked, "note", None)
        traced = note is not None and note[0] == request.id
        try:
            checked = note[1] if note is not None and traced else None
            if isinstance(checked, BaseException):
                raise checked  # inside the tracer: a retry, or Celery's failure path
            if checked is not True and not self._may_run(runtime, scope, arrival, depth, request):
                deferred = getattr(request, "causal_deferred", None)
                raise Ignore() if deferred is None else Parked(deferred)
        except StoreUnavailable as exc:
            raise self._retry_for_store(runtime.settings, arrival, scope, exc) from None
        if traced:
            # The outcome is recorded by _check_then_trace once the tracer has stored it.
            return super().__call__(*args, **kwargs)
        # A tracer that is not the worker's (a custom pool calling run_trace directly):
        # record the outcome here, right after the body.
        try:
            retval = super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject):
            raise  # not a final outcome: a retry succeeds later or the message comes back
        except Exception:
            record_outcome(runtime, scope, arrival.task_id, depth, failed=True, key=arrival.key)
            raise
        record_outcome(runtime, scope, arrival.task_id, depth, failed=False, key=arrival.key)
        return retval

    def _retry_for_store(
        self, settings: CausalSettings, arrival: Arrival, scope: str, exc: StoreUnavailable
    ) -> Retry:
        """The Celery retry of a task whose causal check could not reach the store."""
        retries = self.request.retries or 0
        countdown = store_retry_countdown(
            retries, settings.store_retry_delay, settings.store_retry_max_delay
        )
        try:
            self.retry(exc=exc, countdown=countdown, max_retries=_STORE_MAX_RETRIES)
        except Retry as retry:
            # Celery logs each retry as "Task <name>[<id>] retry: <message>". That line,
            # given this message, is the one line an attempt logs: which leader the task
            # waits for, when it comes back, and why, without the driver's multi-line text.
            follows = f"follows {arrival.leader}, " if arrival.leader else ""
            why = "causal store unreachable"
            if isinstance(exc, ReleaseInProgress):
                why = "an earlier release of this follower is not finished"
            retry.message = (
                f"{why} ({follows}scope {scope!r}); "
                f"retry {retries + 1} in {countdown:.1f}s: {_first_line(str(exc))}"
            )
            return retry
        raise AssertionError("Task.retry returns only by raising")  # pragma: no cover

    def _may_run(
        self, runtime: CausalRuntime, scope: str, arrival: Arrival, depth: int, request: Any
    ) -> bool:
        """Whether the body may run now; ``False`` once the task is parked or skipped.

        Sets ``request.causal_held`` to ``DEFERRED`` (parked) or ``IGNORED`` (duplicate).
        A follower of several leaders waits for one at a time: parked behind the first
        that is not done, released by it (or finding it done as it parks), it checks the
        others again. Each wait is the one-leader handshake (``store.py``), so the last of
        its leaders to succeed is never missed, and one message (so one row) at a time
        stands for the task: it runs once.
        """
        verdict, now = runtime.check(scope, arrival)
        while True:
            if verdict.action is Action.FAIL:
                raise leader_failed_error(arrival, scope, verdict.leader)
            if verdict.action is Action.SKIP_DUPLICATE:
                self._skip_duplicate(runtime, scope, arrival, depth)
                request.causal_held = IGNORED
                return False
            if verdict.action is Action.RUN:
                return True
            assert verdict.leader is not None
            outcome = self._park(runtime, scope, arrival, request, now, verdict)
            if outcome is ParkOutcome.PARKED:
                return False
            if outcome is ParkOutcome.RELEASING:
                # Released by one leader and delivered before its releaser deleted the
                # row, it waits for another: it parks once the row is gone (a retry).
                raise ReleaseInProgress(
                    f"follower {arrival.task_id} waits for {verdict.leader} next; its row "
                    "released by an earlier leader is not deleted yet"
                )
            failed = outcome is ParkOutcome.LEADER_FAILED
            if failed and runtime.settings.on_leader_failure == "fail":
                raise leader_failed_error(arrival, scope, verdict.leader)
            logger.info(
                "task %s: its leader %s (scope %r) %s while it was parking",
                arrival.task_id,
                verdict.leader,
                scope,
                "failed" if failed else "succeeded",
            )
            if len(arrival.leaders) == 1:
                return True
            arrival = dataclasses.replace(arrival, seen=(*arrival.seen, verdict.leader))
            verdict, now = runtime.check(scope, arrival)

    def _skip_duplicate(
        self, runtime: CausalRuntime, scope: str, arrival: Arrival, depth: int
    ) -> None:
        logger.info(
            "duplicate skip: task %s (follows %s, scope %r) already done",
            arrival.task_id,
            arrival.follows,
            scope,
        )
        signals.duplicate_skipped.send(sender=self, task_id=arrival.task_id, scope=scope)
        if arrival.key is not None:
            # Sent again under its key after it ran (the producer re-sent its id): the
            # send made it the key's newest task again, and only its finish frees the key.
            runtime.free_key(scope, arrival.key, arrival.task_id)
        # A redelivered task whose earlier run died after its done record was stored and
        # before its followers were claimed: release what it left waiting. A store outage
        # here retries the message, which comes back to this same step.
        try:
            runtime.release_after_done(scope, arrival.task_id, depth)
        except StoreUnavailable:
            raise
        except Exception:
            # Any other failure (the broker refused a publish) must not turn the task's
            # earlier success into a failure: what is left is the sweep's.
            logger.exception(
                "duplicate of task %s (scope %r): %s", arrival.task_id, scope, RELEASE_FAILED
            )

    def _park(
        self,
        runtime: CausalRuntime,
        scope: str,
        arrival: Arrival,
        request: Any,
        now: float,
        verdict: Verdict,
    ) -> ParkOutcome:
        """Park the delivery behind ``verdict.leader`` unless it settled meanwhile."""
        leader = verdict.leader
        assert leader is not None
        lookback, extra = runtime.settings.lookback, {}
        if len(arrival.leaders) > 1:
            # Its lookback counts from its first park, across its waits for each leader;
            # the stored message keeps which leaders it found done so far.
            first = arrival.first_parked_at if arrival.first_parked_at is not None else now
            lookback = max(0.0, first + lookback - now)
            # Leaders found done count for good: their records may expire before it runs.
            done = [t for t in arrival.leaders if t not in verdict.missing]
            extra = {SEEN: done, FIRST_PARKED: first}
        fields = deferred_fields(
            leader, scope, now, lookback, arrival.key, arrival.leaders, verdict.missing
        )
        # The DEFERRED state is stored before the row exists: once parked, the leader may
        # release the follower and its SUCCESS must not be overwritten by us.
        if not request.ignore_result:
            self.update_state(state=DEFERRED, meta=fields)
        follower = follower_of(
            self.app,
            self,
            request,
            scope=scope,
            leader=leader,
            occurred_at=arrival.published_at if arrival.published_at is not None else now,
            max_bytes=runtime.settings.max_payload_bytes,
            ordering_key=arrival.key,
            headers=extra,
        )
        outcome = runtime.park(follower, lookback)
        if outcome is ParkOutcome.RELEASING and len(arrival.leaders) == 1:
            # A duplicate delivery: the message of the row being released runs the task.
            outcome = ParkOutcome.PARKED
        if outcome is ParkOutcome.PARKED:
            logger.info(
                "parked task %s: waits for leader %s (scope %r)", arrival.task_id, leader, scope
            )
            request.causal_held = DEFERRED
            request.causal_deferred = fields  # the worker's main process sends the event
            signals.follower_parked.send(
                sender=self, task_id=arrival.task_id, leader_id=leader, scope=scope
            )
        return outcome

    def causal_runtime(self) -> CausalRuntime:
        return runtime_for(self.app)

    # The worker's tracer, wrapped: the causal check before it, the record of the outcome
    # after it (tracing.py says why). Where Celery runs a task without ``__trace__``
    # (eager ``apply``), apply() and ``__call__`` make the same check.
    @property
    def __trace__(self) -> Any:
        return self.__dict__.get("_causal_tracer")

    @__trace__.setter
    def __trace__(self, tracer: Any) -> None:
        self.__dict__["_causal_tracer"] = (
            None if tracer is None else functools.partial(check_then_trace, self, tracer)
        )


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


F = TypeVar("F", bound=Callable[..., Any])


def causal_task(
    app: Celery,
    *,
    scope: str = "default",
    ordering_key: Callable[..., str] | None = None,
    **options: Any,
) -> Callable[[F], Any]:
    """``@causal_task(app, scope="orders", **app_task_options)``: a causal task.

    ``ordering_key``, called with a send's arguments, gives the key under which every send
    of the task is ordered: per key, one at a time, in the order the sends were recorded.
    """
    options.setdefault("base", CausalTask)
    if ordering_key is not None:
        if not callable(ordering_key):
            raise TypeError(f"ordering_key must be callable, not {type(ordering_key).__name__}")
        options["ordering_key"] = staticmethod(ordering_key)
    return app.task(scope=scope, **options)  # type: ignore[no-any-return]


def deferred_fields(
    leader: str,
    scope: str,
    now: float,
    lookback: float,
    ordering_key: str | None = None,
    leaders: tuple[str, ...] = (),
    missing: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What a parked task's DEFERRED state and ``task-deferred`` event say about it.

    ``result`` is the line Flower shows on the task's page; the other fields are for
    programs (``AsyncResult(id).info``, event consumers). Times are the store's clock.
    """
    parked = datetime.fromtimestamp(now, timezone.utc)
    release = (parked + timedelta(seconds=lookback)).isoformat(timespec="seconds")
    since = parked.isoformat(timespec="seconds")
    return {
        "follows": leader,
        "scope": scope,
        **({"ordering_key": ordering_key} if ordering_key is not None else {}),
        **({"leaders": list(leaders), "missing": list(missing)} if len(leaders) > 1 else {}),
        "parked_at": since,
        "sweep_releases_at": release,
        "result": (
            f"waits for leader {leader} (scope {scope!r}) since {since}; released when it "
            f"succeeds, or by the sweep from {release}"
            + (
                f"; {len(missing)} of its {len(leaders)} leaders not done: {', '.join(missing)}"
                if len(leaders) > 1
                else ""
            )
        ),
    }
