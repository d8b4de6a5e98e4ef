"""The public API forms and what a parked message keeps, through a real in-process worker."""

from __future__ import annotations

import datetime
import decimal
import logging
import os
import time
import uuid
from typing import Any

import celery.app.task
import pytest
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

import celery_causal
from celery_causal.errors import NotInstalledError
from celery_causal.sql import SQLStore, open_store
from celery_causal.testing import MemoryStore
from tests.helpers import truncate, wait_for
from tests.integration.harness import Harness


def test_base_class_form_parks_and_releases_in_the_default_scope() -> None:
    store = MemoryStore()
    h = Harness(store)
    seen: list[Any] = []

    @h.app.task(base=celery_causal.CausalTask, name="tests.based", shared=False)
    def based(value: Any) -> None:
        seen.append(value)

    based.apply_async(("follower",), task_id=h.id("f"), follows=h.id("lead"))
    based.apply_async(("leader",), task_id=h.id("lead"))
    h.run_until(lambda: len(seen) == 2, "both bodies")
    assert seen == ["leader", "follower"]
    assert store.stats() == []  # the follower was parked in scope "default", then released


def test_parked_and_duplicate_deliveries_end_before_the_body_starts() -> None:
    # Given a worker that records every task whose body starts (Celery's task_prerun)
    store = MemoryStore()
    h = Harness(store)
    started: list[str] = []

    def record(sender: Any = None, task_id: str = "", **_: Any) -> None:
        if getattr(sender, "app", None) is h.app:
            started.append(task_id)

    signals.task_prerun.connect(record, weak=False)
    try:
        # When a follower parks, its leader runs and releases it, and the leader's
        # message is delivered again
        h.send("follower", "leader")
        h.send("leader")
        h.send("leader")
        h.send("marker")
        h.run_until(lambda: "marker" in h.ran, "marker")
    finally:
        signals.task_prerun.disconnect(record)
    # Then each body ran once, and Celery started each task once: the parked delivery and
    # the duplicate ended before the tracer
    assert h.ran == ["leader", "follower", "marker"] or h.ran == ["leader", "marker", "follower"]
    assert sorted(started) == sorted(h.id(label) for label in ("leader", "follower", "marker"))


def test_parked_message_keeps_argument_types_headers_and_callbacks(pg_store: SQLStore) -> None:
    h = Harness(pg_store)
    received: list[Any] = []

    @celery_causal.causal_task(h.app, name="tests.typed", scope="events", shared=False, bind=True)
    def typed(self: Any, *args: Any, **kwargs: Any) -> str:
        headers = self.request.headers
        received.append((args, kwargs, headers.get("tenant"), headers["causal_published_at"]))
        return "typed-done"

    @h.app.task(name="tests.callback", shared=False)
    def callback(value: str) -> None:
        received.append(("callback", value))

    values = (
        datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.timezone.utc),
        uuid.UUID(int=7),
        decimal.Decimal("19.99"),
        b"\x00raw",
    )
    published_at = time.time() - 10  # the event's first publish; kept across re-enqueue
    typed.apply_async(
        values,
        {"when": datetime.date(2026, 1, 1)},
        task_id=h.id("typed"),
        follows=h.id("L"),
        headers={"tenant": "acme", "causal_published_at": published_at},
        link=callback.s(),
    )
    with h.worker():
        wait_for(lambda: pg_store.count_followers("events", h.id("L")) == 1, 30, "parked")
        h.send("L")
        wait_for(lambda: len(received) == 2, 30, "follower and its callback")
    truncate(pg_store)
    assert received[0] == (values, {"when": datetime.date(2026, 1, 1)}, "acme", published_at)
    assert received[1] == ("callback", "typed-done")


def test_a_task_of_an_app_without_install_is_a_clear_error() -> None:
    app = Celery("not-installed", broker="memory://", backend="cache+memory://")

    @app.task(base=celery_causal.CausalTask, shared=False)
    def lonely() -> None: ...

    from celery_causal.registry import runtime_for

    with pytest.raises(NotInstalledError, match="install"):
        runtime_for(app)


def test_engines_are_not_shared_across_fork(pg_url: str) -> None:
    store = open_store(pg_url)
    store.record_done("default", "parent-before-fork")  # the parent holds a pooled connection
    pid = os.fork()
    if pid == 0:  # child: must open its own connection and leave the parent's alone
        try:
            store.record_done("default", "child")
            ok = store.lookup("default", ["child", "parent-before-fork"]).done
            os._exit(0 if ok == {"child", "parent-before-fork"} else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's pooled connection still works after the child exited.
    assert store.lookup("default", ["child"]).done == {"child"}
    truncate(store)
    store.close()


def test_a_task_that_follows_itself_runs_at_once() -> None:
    store = MemoryStore()
    h = Harness(store)
    h.send("selfish", "selfish")
    h.run_until(lambda: h.ran == ["selfish"], "the task")
    assert store.stats() == []


def test_an_oversized_follower_fails_loudly_at_park_time_and_is_not_lost(
    pg_store: SQLStore,
) -> None:
    from celery_causal.errors import PayloadError

    h = Harness(pg_store, causal_max_payload_bytes=2048)
    result = h.event.apply_async(("x" * 5000,), task_id=h.id("big"), follows=h.id("L"))
    with h.worker(), pytest.raises(PayloadError, match="causal_max_payload_bytes"):
        result.get(timeout=30)
    assert result.state == "FAILURE"  # visible to the producer, not acked and forgotten
    assert pg_store.stats() == []


def test_sqlite_parks_are_durable_and_the_worker_forks_with_no_connection_open(
    tmp_path: Any,
) -> None:
    from types import SimpleNamespace

    from sqlalchemy import text

    from celery_causal.registry import runtime_for
    from celery_causal.wiring import CausalWorkerStep

    # Given an app on the embedded SQLite store
    app = Celery(f"sqlite{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.causal_store_url = f"sqlite:///{tmp_path / 'causal.sqlite3'}"
    celery_causal.install(app, beat=False)
    # When the worker's main process starts (creating the schema) and is about to fork
    CausalWorkerStep(SimpleNamespace(app=app, task_events=False))
    store = runtime_for(app).store
    assert isinstance(store, SQLStore)
    # Then it holds no SQLite connection a pool child would inherit
    assert not store._db.has_engine()
    # and every commit of a park waits for the disk (synchronous=FULL)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar_one() == 2
    store.close()


def test_follows_on_a_task_that_is_not_causal_is_refused_at_send_time() -> None:
    # Given a plain task in an app with celery-causal installed, and a record of publishes
    h = Harness(MemoryStore())

    @h.app.task(name="tests.plain", shared=False)
    def plain() -> None: ...

    published: list[Any] = []

    def record(sender: Any = None, **_: Any) -> None:
        published.append(sender)

    signals.after_task_publish.connect(record, weak=False)
    try:
        # When it is sent with follows= in each form a producer has, then each send is
        # refused with an error that names the task, and nothing is published
        sends = [
            lambda: plain.apply_async(follows="leader"),
            lambda: plain.s().set(follows="leader").delay(),
            lambda: h.app.send_task("tests.plain", follows="leader"),
            lambda: h.app.send_task("tests.unknown", follows="leader"),
        ]
        for send in sends:
            with pytest.raises(celery_causal.NotCausalError, match="is not a causal task"):
                send()
        with pytest.raises(celery_causal.NotCausalError, match=r"^task tests\.plain is not"):
            plain.apply_async(follows="leader")
        assert published == []
        # A plain task sent without a leader is sent as before
        plain.apply_async(follows=None)
        assert published == ["tests.plain"]
    finally:
        signals.after_task_publish.disconnect(record)


def test_send_task_with_follows_parks_a_causal_task_behind_its_leader() -> None:
    h = Harness(MemoryStore())
    h.app.send_task("tests.event", ("follower",), task_id=h.id("f"), follows=h.id("lead"))
    h.send("lead")
    h.run_until(lambda: len(h.ran) == 2, "both bodies")
    assert h.ran == ["lead", "follower"]


def test_the_sweep_stores_no_result_unless_its_caller_asks_for_one() -> None:
    # Given a worker; the sweep sent as beat sends it, and once asking for its outcome
    h = Harness(MemoryStore())
    sweep = h.app.tasks[celery_causal.SWEEP_TASK]
    assert sweep.ignore_result
    finished: list[str] = []

    def record(sender: Any = None, **_: Any) -> None:
        if sender is sweep:
            finished.append(sweep.request.id)

    signals.task_postrun.connect(record, weak=False)
    try:
        as_beat = h.app.send_task(celery_causal.SWEEP_TASK, task_id=h.id("beat"))
        asked = h.app.send_task(
            celery_causal.SWEEP_TASK, task_id=h.id("asked"), ignore_result=False
        )
        h.run_until(lambda: len(finished) == 2, "both sweeps")
    finally:
        signals.task_postrun.disconnect(record)
    # Then the one sent as beat sends it has no outcome in the result backend, and the one
    # that asked has, where Celery's tracer honours a per-call ignore_result (5.7 does;
    # 5.5 reads only the task's own flag, and then stores neither)
    assert h.app.backend.get_task_meta(as_beat.id)["status"] == "PENDING"
    if hasattr(celery.app.task, "get_actual_ignore_result"):
        expected = {"released": 0, "refused": 0, "expired_done": 0, "cycles": 0}
        assert asked.get(timeout=10) == expected
    else:
        assert h.app.backend.get_task_meta(asked.id)["status"] == "PENDING"


def test_a_parked_task_is_logged_as_parked_not_as_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a follower that parks, then a task delivered twice
    h = Harness(MemoryStore())
    h.send("follower", "leader")
    h.send("done")
    h.send("done")

    def about(label: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if h.id(label) in r.getMessage()]

    with (
        caplog.at_level(logging.INFO),
        start_worker(
            h.app, pool="solo", perform_ping_check=False, shutdown_timeout=30, loglevel="INFO"
        ),
    ):
        wait_for(lambda: any("ignored" in r.getMessage() for r in about("done")), 30, "dup")
    # Then Celery's tracer says "ignored" of the duplicate only; the follower's line says
    # that it waits for its leader
    assert not [r for r in about("follower") if "ignored" in r.getMessage()]
    (parked,) = [r for r in about("follower") if r.name == "celery_causal"]
    assert parked.args == (h.id("follower"), h.id("leader"), "events")
