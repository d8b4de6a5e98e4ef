"""Celery wiring: the task base class, ``install(app)``, the worker step, the sweep task and
its beat entry. The tracer interception lives in ``tracing.py``."""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task, bootsteps, signals
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry
from celery.result import EagerResult
from celery.states import FAILURE, IGNORED, SUCCESS
from celery.utils import uuid
from kombu.utils.functional import maybe_list

from .core import DEFERRED, Action, Arrival, store_retry_countdown
from .errors import (
    ConfigurationError,
    InvalidIdError,
    LeaderFailed,
    NotInstalledError,
    StoreUnavailable,
)
from .payload import FOLLOWS, PUBLISHED_AT, check_id, leader_id
from .runtime import CausalRuntime
from .sending import guard_send_task
from .settings import CausalSettings
from .sql import open_store
from .store import CausalStore, ParkOutcome
from .tracing import (
    RELEASE_FAILED,
    arrival_from,
    check_then_trace,
    leader_failed_error,
    pre_checked,
    record_outcome,
)

logger = logging.getLogger("celery_causal")

SWEEP_TASK = "celery_causal.sweep"
BEAT_ENTRY = "celery-causal-sweep"
#: Exit status of a worker or beat whose causal settings are wrong (sysexits.h EX_CONFIG).
EX_CONFIG = 78

#: Store-outage retries do not give up: the task waits for the database rather than
#: failing or running out of order.
_STORE_MAX_RETRIES = 10**9

_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_runtimes: weakref.WeakKeyDictionary[Any, CausalRuntime] = weakref.WeakKeyDictionary()


def _install_options(app: Any) -> dict[str, Any]:
    options = _installed.get(app)
    if options is None:
        raise NotInstalledError(f"celery_causal.install(app) was not called for app {app.main!r}")
    return options


def runtime_for(app: Any) -> CausalRuntime:
    """The app's causal runtime, built on first use from ``app.conf``."""
    runtime = _runtimes.get(app)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = _runtimes.get(app)
        if runtime is None:
            options = _install_options(app)
            settings = CausalSettings.from_conf(app.conf)
            store = options.get("store")
            if store is None:
                store = open_store(
                    settings.store_url, transaction_pooler=settings.store_transaction_pooler
                )
            runtime = CausalRuntime(app, settings, store)
            _runtimes[app] = runtime
        return runtime


def operator_runtime(app: Any) -> CausalRuntime:
    """A runtime of its own for the ``celery causal`` commands, whose store never creates
    the schema: pointed at a mistyped database, a command must say that the tables are
    missing, not create them there (only ``migrate`` creates them, by asking to)."""
    options = _install_options(app)
    settings = CausalSettings.from_conf(app.conf)
    store = options.get("store")
    if store is None:
        store = open_store(
            settings.store_url,
            create_schema=False,
            transaction_pooler=settings.store_transaction_pooler,
        )
    return CausalRuntime(app, settings, store=store)


def runtime_or_exit(app: Any) -> CausalRuntime:
    """The app's runtime, for a worker or beat starting up; exit at once if a setting is wrong.

    Celery would print a worker's ConfigurationError with its whole traceback, and beat's
    would be logged and swallowed by the signal dispatch, beat running on without the
    sweep. A wrong setting is the operator's to fix: one line on stderr, and the exit
    status of a configuration error (sysexits' EX_CONFIG, as ``celery causal`` uses).
    SystemExit passes through Celery's signal dispatch, which catches only Exception.
    """
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG) from None


class CausalTask(Task):  # type: ignore[misc]
    """Base class of causal tasks: ``@app.task(base=CausalTask)``.

    Send with ``follows=<leader task id or AsyncResult>``; the task then runs only after
    its leader succeeded, or once the sweep released it (it waited ``causal_lookback`` from
    its park for a leader that never came).
    """

    #: Followers and done records are isolated by scope; leader and follower share one.
    scope: str = "default"

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
        **options: Any,
    ) -> Any:
        headers = dict(options.pop("headers", None) or {})
        if follows is not None:
            headers[FOLLOWS] = leader_id(follows)
        if task_id is not None:
            check_id(task_id, "task_id")
        if not isinstance(self.scope, str):
            raise InvalidIdError(f"scope of {self.name} must be a string, not {self.scope!r}")
        check_id(self.scope, f"scope of {self.name}")
        # The event's occurrence time, which orders a leader's followers when they are
        # released; retries and re-enqueues keep it (setdefault).
        headers.setdefault(PUBLISHED_AT, time.time())
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
        **options: Any,
    ) -> Any:
        """Run the task here (``task_always_eager``, or ``.apply()``), in causal order.

        The same check as on a worker: a follower whose leader has not succeeded is parked
        and its result is ``DEFERRED``; it runs when its leader is applied here and
        succeeds (with ``task_always_eager``; otherwise its leader's release publishes it).
        A duplicate of a task recorded done is ``IGNORED``.
        """
        task_id = task_id or uuid()
        headers = dict(headers or {})
        if follows is not None:
            headers[FOLLOWS] = leader_id(follows)
        headers.setdefault(PUBLISHED_AT, time.time())
        runtime = runtime_for(self.app)
        scope = self.scope
        context = Context(
            {
                "id": task_id,
                "task": self.name,
                "headers": headers or {},
                "callbacks": maybe_list(link),  # type: ignore[no-untyped-call]
                "errbacks": maybe_list(link_error),  # type: ignore[no-untyped-call]
                "ignore_result": options.get("ignore_result", self.ignore_result),
                "delivery_info": {"priority": options.get("priority")},
                "is_eager": True,
            },
            args=args or (),
            kwargs=kwargs or {},
        )
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
            record_outcome(runtime, scope, task_id, depth, failed=True)  # propagated
            raise
        finally:
            pre_checked.note = None
        if result.state in (SUCCESS, FAILURE):
            record_outcome(runtime, scope, task_id, depth, failed=result.state == FAILURE)
        return result

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
                raise Ignore()
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
            record_outcome(runtime, scope, arrival.task_id, depth, failed=True)
            raise
        record_outcome(runtime, scope, arrival.task_id, depth, failed=False)
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
            retry.message = (
                f"causal store unreachable ({follows}scope {scope!r}); "
                f"retry {retries + 1} in {countdown:.1f}s: {_first_line(str(exc))}"
            )
            return retry
        raise AssertionError("Task.retry returns only by raising")  # pragma: no cover

    def _may_run(
        self, runtime: CausalRuntime, scope: str, arrival: Arrival, depth: int, request: Any
    ) -> bool:
        """Whether the body may run now; ``False`` once the task is parked or skipped.

        Sets ``request.causal_held`` to ``DEFERRED`` (parked) or ``IGNORED`` (duplicate).
        """
        verdict, now = runtime.check(scope, arrival)
        if verdict.action is Action.FAIL:
            raise leader_failed_error(arrival, scope)
        if verdict.action is Action.SKIP_DUPLICATE:
            logger.info(
                "duplicate skip: task %s (follows %s, scope %r) already done",
                arrival.task_id,
                arrival.follows,
                scope,
            )
            # A redelivered task whose earlier run died after its done record was stored
            # and before its followers were claimed: release what it left waiting. A store
            # outage here retries the message, which comes back to this same step.
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
            request.causal_held = IGNORED
            return False
        if verdict.action is Action.PARK:
            # The DEFERRED state is stored before the row exists: once parked, the leader
            # may release the follower and its SUCCESS must not be overwritten by us.
            if not request.ignore_result:
                self.update_state(state=DEFERRED, meta={"follows": arrival.leader, "scope": scope})
            outcome = runtime.park(
                scope=scope, task=self, request=request, arrival=arrival, now=now
            )
            if outcome is ParkOutcome.LEADER_FAILED:
                if runtime.settings.on_leader_failure == "fail":
                    raise leader_failed_error(arrival, scope)
            elif outcome is ParkOutcome.PARKED:
                logger.info(
                    "parked task %s: waits for leader %s (scope %r)",
                    arrival.task_id,
                    arrival.leader,
                    scope,
                )
                runtime.send_task_event(
                    "task-deferred",
                    arrival.task_id,
                    request.hostname or "",
                    follows=arrival.leader,
                    scope=scope,
                    name=self.name,
                )
                request.causal_held = DEFERRED
                return False
            logger.info(
                "task %s runs: its leader %s (scope %r) %s while it was parking",
                arrival.task_id,
                arrival.leader,
                scope,
                "failed" if outcome is ParkOutcome.LEADER_FAILED else "succeeded",
            )
        return True

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


def causal_task(app: Celery, *, scope: str = "default", **options: Any) -> Callable[[F], Any]:
    """``@causal_task(app, scope="orders", **app_task_options)``: a causal task."""
    options.setdefault("base", CausalTask)
    return app.task(scope=scope, **options)  # type: ignore[no-any-return]


class CausalWorkerStep(bootsteps.Step):  # type: ignore[misc]
    """Validates the settings and creates the schema when a worker starts.

    A wrong value stops the worker with an error naming the setting, instead of failing
    its first causal task.
    """

    name = "celery-causal"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        runtime = runtime_or_exit(worker.app)
        runtime.send_events = bool(worker.task_events)  # -E; inherited by pool processes
        try:
            runtime.store.create_schema()
        except StoreUnavailable as exc:
            # The database may come up after the worker (compose, k8s): tasks retry until
            # it answers, and the schema is created on first use.
            logger.error("causal store not reachable at worker start: %s", exc)
        finally:
            # The main process forks the pool next: no connection may cross the fork (an
            # SQLite handle used on both sides of one corrupts the file's locks). Each
            # process that runs tasks opens its own.
            runtime.store.close()


def _sweep_task(app: Any) -> Callable[[], dict[str, int]]:
    def sweep() -> dict[str, int]:
        """Release lost followers and expire old done records (celery-causal)."""
        return runtime_for(app).sweep().as_dict()

    return sweep


def install(app: Celery, *, beat: bool = True, store: CausalStore | None = None) -> None:
    """Wire celery-causal into ``app``: the one call users make. Idempotent.

    Registers the ``celery_causal.sweep`` task and, unless ``beat=False``, its Celery beat
    entry. ``store`` replaces the store built from ``causal_store_url`` (tests pass a
    :class:`~celery_causal.testing.MemoryStore`).
    """
    with _lock:
        first = app not in _installed
        _installed[app] = {"store": store, "beat": beat}
        _runtimes.pop(app, None)
    if not first:
        return
    # Every sweep interval, for ever: its outcome is in the worker's log line and its
    # task-succeeded event, not worth a result-backend entry each time. A caller that
    # wants it sends the task with ignore_result=False.
    app.task(name=SWEEP_TASK, ignore_result=True, shared=False)(_sweep_task(app))

    app.steps["worker"].add(CausalWorkerStep)
    guard_send_task(app, CausalTask)
    if beat:
        signals.beat_init.connect(_beat_hook(app), weak=False)


def _beat_hook(app: Any) -> Callable[..., None]:
    def on_beat_init(sender: Any = None, **_: Any) -> None:
        # Added to the running scheduler, not to app.conf.beat_schedule, so the entry
        # survives a later ``app.conf.beat_schedule = {...}`` or config_from_object().
        if getattr(sender, "app", None) is not app:
            return
        interval = runtime_or_exit(app).settings.sweep_interval
        scheduler = sender.scheduler
        scheduler.update_from_dict(
            {
                BEAT_ENTRY: {
                    "task": SWEEP_TASK,
                    "schedule": interval,
                    "options": {"expires": interval},
                }
            }
        )

    return on_beat_init
