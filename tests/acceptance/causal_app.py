"""The Celery app the acceptance tests run in real worker processes.

Configured from the environment the test fixtures set, so each test run (and each worker a
test starts for itself) uses its own database and its own key prefix on Redis, or queue
names on RabbitMQ (CAUSAL_TEST_BROKER_URL; the result backend is Redis either way).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, signals
from kombu import Exchange, Queue

import celery_causal
from celery_causal import signals as causal_signals

REDIS_URL = os.environ.get("CAUSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BROKER_URL = os.environ.get("CAUSAL_TEST_BROKER_URL") or REDIS_URL
_redis = redis.Redis.from_url(REDIS_URL)


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class Handle:
    app: Celery
    prefix: str
    step: Any
    other_scope_step: Any
    flaky: Any
    broken: Any
    ping: Any
    #: Causal: logs "<label>:<state of its leader's AsyncResult>" (test_ordering_edges).
    observe: Any = None
    #: Plain: sending it takes CAUSAL_TEST_SLOW_SEND seconds (a slow link callback).
    slow_to_send: Any = None
    routing: Routing | None = None
    #: Causal: logs, as JSON, the delivery its worker received (test_brokers).
    probe: Any = None
    #: Causal: logs "<label>:first" or "<label>:redelivered", then waits for the test.
    hold: Any = None
    #: Causal, ordered per ``key`` (its second argument): logs its start and end.
    keyed: Any = None


@dataclass(frozen=True)
class Routing:
    """The queues of one prefix. On Redis its key prefix isolates them already; on RabbitMQ
    (one vhost per test run) their names carry the prefix."""

    default: str
    #: Bound to the topic exchange ``topic`` by "<routed>.#"; x-max-priority 9.
    routed: str
    topic: str
    #: A quorum queue, declared only with CAUSAL_TEST_QUORUM_QUEUE set (RabbitMQ).
    quorum: str


def routing(prefix: str, broker_url: str) -> Routing:
    own = prefix if broker_url.startswith(("amqp://", "pyamqp://")) else ""
    return Routing(f"{own}celery", f"{prefix}routed", f"{prefix}topic", f"{prefix}quorum")


def _queues(names: Routing) -> list[Queue]:
    queues = [
        Queue(names.default, Exchange(names.default), routing_key=names.default),
        Queue(
            names.routed,
            Exchange(names.topic, type="topic"),
            routing_key=f"{names.routed}.#",
            queue_arguments={"x-max-priority": 9},
        ),
    ]
    if os.environ.get("CAUSAL_TEST_QUORUM_QUEUE"):
        # Only where a test asks: a worker that consumes a quorum queue also declares
        # Celery's native delayed-delivery exchanges and queues.
        queues.append(
            Queue(
                names.quorum,
                Exchange(names.quorum),
                routing_key=names.quorum,
                queue_arguments={"x-queue-type": "quorum"},
            )
        )
    return queues


def create(
    prefix: str | None = None, store_url: str | None = None, broker_url: str | None = None
) -> Handle:
    prefix = prefix or _env("CAUSAL_TEST_PREFIX", "causal-test-local:")
    broker_url = broker_url or BROKER_URL
    app = _configured(prefix, store_url, broker_url)
    celery_causal.install(app)
    # A user who assigns beat_schedule after install: the sweep's beat entry must survive.
    app.conf.beat_schedule = {"acc-hourly-ping": {"task": "acc.ping", "schedule": 3600.0}}
    step, other_scope_step, flaky, broken = _ordering_tasks(app, prefix)
    ping, observe, slow_to_send = _probe_tasks(app, prefix)
    probe, hold = _broker_tasks(app, prefix)
    keyed = _keyed_task(app, prefix)
    return Handle(
        app,
        prefix,
        step,
        other_scope_step,
        flaky,
        broken,
        ping,
        observe,
        slow_to_send,
        routing(prefix, broker_url),
        probe,
        hold,
        keyed,
    )


def _configured(prefix: str, store_url: str | None, broker_url: str) -> Celery:
    transport = {"global_keyprefix": prefix}
    if os.environ.get("CAUSAL_TEST_VISIBILITY_TIMEOUT"):
        # Unacked messages of a killed worker come back after this many seconds.
        transport.update(
            visibility_timeout=float(os.environ["CAUSAL_TEST_VISIBILITY_TIMEOUT"]),
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
        )
    app = Celery("causal_acceptance", broker=broker_url, backend=REDIS_URL)
    acks_late = bool(os.environ.get("CAUSAL_TEST_ACKS_LATE"))
    names = routing(prefix, broker_url)
    app.conf.update(
        task_default_queue=names.default,
        task_queues=_queues(names),
        broker_transport_options=transport,
        result_backend_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        task_acks_late=acks_late,
        task_reject_on_worker_lost=acks_late,
        causal_store_url=store_url or os.environ.get("CAUSAL_STORE_URL"),
        causal_lookback=float(_env("CAUSAL_LOOKBACK", "900")),
        causal_seen_ttl=float(_env("CAUSAL_SEEN_TTL", "1800")),
        causal_release_timeout=float(_env("CAUSAL_RELEASE_TIMEOUT", "60")),
        causal_sweep_interval=float(_env("CAUSAL_SWEEP_INTERVAL", "30")),
        causal_on_leader_failure=_env("CAUSAL_ON_LEADER_FAILURE", "wait"),
        causal_store_retry_delay=float(_env("CAUSAL_STORE_RETRY_DELAY", "1")),
        causal_store_retry_max_delay=float(_env("CAUSAL_STORE_RETRY_MAX_DELAY", "60")),
        causal_batch_size=int(_env("CAUSAL_BATCH_SIZE", "500")),
        causal_deduplicate=_env("CAUSAL_DEDUPLICATE", "always"),
        causal_max_depth=int(_env("CAUSAL_MAX_DEPTH", "20")),
        causal_local_hold=float(_env("CAUSAL_LOCAL_HOLD", "1")),
        causal_local_lookahead=float(_env("CAUSAL_LOCAL_LOOKAHEAD", "0.05")),
    )
    return app


def _ordering_tasks(app: Celery, prefix: str) -> tuple[Any, Any, Any, Any]:
    step_sleep = float(_env("CAUSAL_TEST_STEP_SLEEP", "0"))

    @celery_causal.causal_task(app, name="acc.step", scope="acc", shared=False)
    def step(log: str, label: str) -> str:
        """Append ``label`` to the Redis list ``log``: the order bodies ran, across processes."""
        _redis.rpush(prefix + log, label)
        if step_sleep:
            time.sleep(step_sleep)
        return label

    @celery_causal.causal_task(app, name="acc.other_scope_step", scope="acc-other", shared=False)
    def other_scope_step(log: str, label: str) -> str:
        _redis.rpush(prefix + log, label)
        return label

    @celery_causal.causal_task(
        app,
        name="acc.flaky",
        scope="acc",
        shared=False,
        bind=True,
        autoretry_for=(RuntimeError,),
        max_retries=5,
        default_retry_delay=0.1,
    )
    def flaky(self: Any, log: str, label: str, failures: int) -> str:
        """Fail ``failures`` times, then succeed (Celery retries it)."""
        _redis.rpush(prefix + log, f"{label}:try{self.request.retries}")
        if self.request.retries < failures:
            raise RuntimeError(f"{label} fails on try {self.request.retries}")
        return label

    @celery_causal.causal_task(app, name="acc.broken", scope="acc", shared=False)
    def broken(log: str, label: str) -> str:
        _redis.rpush(prefix + log, label)
        raise ValueError(f"{label} is broken")

    return step, other_scope_step, flaky, broken


def _record_hooks(app: Celery, prefix: str) -> None:
    """Task ids the signals name, appended to Redis lists (prefix + what): what happened in
    the worker's processes, without reading its log. "started": Celery's task_prerun;
    "retried": task_retry; "parked" and "skipped": celery_causal's follower_parked and
    duplicate_skipped. One entry per occurrence."""

    def recorder(what: str, task_id: Callable[[dict[str, Any]], str]) -> Callable[..., None]:
        def record(sender: Any = None, **fields: Any) -> None:
            if getattr(sender, "app", None) is app:
                _redis.rpush(prefix + what, task_id(fields))

        return record

    signals.task_prerun.connect(recorder("started", lambda f: f["task_id"]), weak=False)
    signals.task_retry.connect(recorder("retried", lambda f: f["request"].id), weak=False)
    for what, signal in (
        ("parked", causal_signals.follower_parked),
        ("skipped", causal_signals.duplicate_skipped),
    ):
        signal.connect(recorder(what, lambda f: f["task_id"]), weak=False)


def _keyed_task(app: Celery, prefix: str) -> Any:
    @celery_causal.causal_task(
        app,
        name="acc.keyed",
        scope="acc",
        shared=False,
        bind=True,
        ordering_key=lambda log, key, label, fail=False: key,
    )
    def keyed(self: Task, log: str, key: str, label: str, fail: bool = False) -> str:
        """Log, as JSON, ``[key, label, "start", task id, the task it follows]``, then
        ``[key, label, "end"]``: the order of a key's bodies, and the chain of its sends."""
        headers = self.request.headers or {}
        follows = headers.get("causal_follows", getattr(self.request, "causal_follows", None))
        entry = [key, label, "start", self.request.id, follows]
        _redis.rpush(prefix + log, json.dumps(entry))
        time.sleep(0.002)  # a window in which another body of the key would show
        _redis.rpush(prefix + log, json.dumps([key, label, "end"]))
        if fail:
            raise ValueError(f"{label} fails")
        return label

    return keyed


def _probe_tasks(app: Celery, prefix: str) -> tuple[Any, Any, Any]:
    _record_hooks(app, prefix)

    @app.task(name="acc.ping", shared=False)
    def ping() -> str:
        return "pong"

    @celery_causal.causal_task(app, name="acc.observe", scope="acc", shared=False)
    def observe(log: str, label: str, leader_id: str) -> str:
        """Log the state of its leader's result as this body sees it."""
        state: str = app.AsyncResult(leader_id).state
        _redis.rpush(prefix + log, f"{label}:{state}")
        return state

    slow_send = float(_env("CAUSAL_TEST_SLOW_SEND", "0.3"))

    class SlowToSend(Task):  # type: ignore[misc]
        """Sending it takes ``slow_send`` seconds. As a link callback it holds its task
        between the end of the body and the SUCCESS the tracer stores after sending it."""

        def apply_async(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(slow_send)
            return super().apply_async(*args, **kwargs)

    @app.task(name="acc.slow_to_send", base=SlowToSend, shared=False)
    def slow_to_send(*_: Any) -> str:
        return "sent"

    return ping, observe, slow_to_send


def _broker_tasks(app: Celery, prefix: str) -> tuple[Any, Any]:
    @celery_causal.causal_task(app, name="acc.probe", scope="acc", shared=False, bind=True)
    def probe(self: Any, log: str, label: str) -> str:
        """Log the delivery this body received: routing, priority, reply-to, release."""
        request = self.request
        delivery = request.delivery_info or {}
        released = (request.headers or {}).get("causal_released") or getattr(
            request, "causal_released", None
        )
        seen = {
            "label": label,
            "exchange": delivery.get("exchange"),
            "routing_key": delivery.get("routing_key"),
            "priority": delivery.get("priority"),
            "redelivered": bool(delivery.get("redelivered")),
            "reply_to": request.reply_to,
            "released": released,
        }
        _redis.rpush(prefix + log, json.dumps(seen))
        return label

    @celery_causal.causal_task(app, name="acc.hold", scope="acc", shared=False, bind=True)
    def hold(self: Any, log: str, label: str, fail: bool = False) -> str:
        """Log whether this delivery is a redelivery, then wait for the test's go (and
        fail after it if asked)."""
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        _redis.rpush(prefix + log, f"{label}:{'redelivered' if redelivered else 'first'}")
        if _redis.blpop([f"{prefix}go:{label}"], timeout=120) is None:
            raise TimeoutError(f"no go for {label}")
        if fail:
            raise ValueError(f"{label} fails after its go")
        return label

    return probe, hold


_default = create()
app = _default.app
step, other_scope_step, ping = _default.step, _default.other_scope_step, _default.ping
