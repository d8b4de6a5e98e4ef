"""``install(app)``: the sweep task, its beat entry, the worker's start-up step and the check
of ``follows=`` on sends. The one call users make."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps, signals

from .errors import StoreUnavailable
from .registry import register, runtime_for, runtime_or_exit
from .sending import guard_send_task
from .store import CausalStore
from .task import CausalTask

logger = logging.getLogger("celery_causal")

SWEEP_TASK = "celery_causal.sweep"
BEAT_ENTRY = "celery-causal-sweep"


def install(app: Celery, *, beat: bool = True, store: CausalStore | None = None) -> None:
    """Wire celery-causal into ``app``: the one call users make. Idempotent.

    Registers the ``celery_causal.sweep`` task and, unless ``beat=False``, its Celery beat
    entry. ``store`` replaces the store built from ``causal_store_url`` (tests pass a
    :class:`~celery_causal.testing.MemoryStore`).
    """
    # The beat hook is kept alive by the registry's entry for the app (the signal holds it
    # weakly), so it goes with the app.
    hook = _beat_hook(app) if beat else None
    if not register(app, {"store": store, "beat": beat, "beat_hook": hook}):
        return
    # Every sweep interval, for ever: its outcome is in the worker's log line and its
    # task-succeeded event, not worth a result-backend entry each time. A caller that
    # wants it sends the task with ignore_result=False.
    app.task(name=SWEEP_TASK, ignore_result=True, shared=False)(_sweep_task(app))
    app.steps["worker"].add(CausalWorkerStep)
    guard_send_task(app, CausalTask)
    if hook is not None:
        signals.beat_init.connect(hook)


class CausalWorkerStep(bootsteps.Step):  # type: ignore[misc]
    """Validates the settings and creates the schema when a worker starts.

    A wrong value stops the worker with one line naming the setting, instead of failing
    its first causal task.
    """

    name = "celery-causal"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        runtime = runtime_or_exit(worker.app)
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


def _beat_hook(app: Any) -> Callable[..., None]:
    app_ref = weakref.ref(app)

    def on_beat_init(sender: Any = None, **_: Any) -> None:
        # Added to the running scheduler, not to app.conf.beat_schedule, so the entry
        # survives a later ``app.conf.beat_schedule = {...}`` or config_from_object().
        app = app_ref()
        if app is None or getattr(sender, "app", None) is not app:
            return
        interval = runtime_or_exit(app).settings.sweep_interval
        sender.scheduler.update_from_dict(
            {
                BEAT_ENTRY: {
                    "task": SWEEP_TASK,
                    "schedule": interval,
                    "options": {"expires": interval},
                }
            }
        )

    return on_beat_init
