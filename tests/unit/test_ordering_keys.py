"""Sending under an ordering key: what the producer records and what the message carries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.signals import before_task_publish

import celery_causal
from celery_causal import InvalidIdError, InvalidLeaderError, NotCausalError, NotInstalledError
from celery_causal.core import DEFERRED
from celery_causal.testing import MemoryStore
from tests.helpers import age


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message published while the test runs."""
    seen: list[dict[str, Any]] = []

    def capture(headers: dict[str, Any], **_: Any) -> None:
        seen.append(dict(headers))

    before_task_publish.connect(capture, weak=False)
    yield seen
    before_task_publish.disconnect(capture)


def app_with_store(**conf: Any) -> tuple[Celery, MemoryStore]:
    app = Celery("keys", broker="memory://", set_as_current=False)
    app.conf.update(**conf)
    store = MemoryStore()
    celery_causal.install(app, store=store, beat=False)
    return app, store


def test_each_send_under_a_key_follows_the_one_recorded_before_it(
    published: list[dict[str, Any]],
) -> None:
    app, store = app_with_store()

    @celery_causal.causal_task(app, name="keys.charge", shared=False)
    def charge(customer: int) -> None: ...

    ids = [charge.apply_async((7,), ordering_key="customer-7").id for _ in range(3)]
    other = charge.apply_async((8,), ordering_key="customer-8").id
    assert [(h["id"], h.get("causal_follows"), h["causal_key"]) for h in published] == [
        (ids[0], None, "customer-7"),
        (ids[1], ids[0], "customer-7"),
        (ids[2], ids[1], "customer-7"),
        (other, None, "customer-8"),
    ]
    assert [t.task_id for t in store.key_tails("customer-7")] == [ids[2]]


def test_a_tasks_ordering_key_callable_gets_each_sends_arguments(
    published: list[dict[str, Any]],
) -> None:
    app, store = app_with_store()

    @celery_causal.causal_task(
        app,
        name="keys.charge",
        scope="billing",
        shared=False,
        ordering_key=lambda customer, amount=0: f"customer-{customer}",
    )
    def charge(customer: int, amount: int = 0) -> None: ...

    first = charge.delay(7, amount=10)
    second = charge.s(7, amount=20).delay()
    assert [h.get("causal_follows") for h in published] == [None, first.id]
    assert [(t.scope, t.task_id) for t in store.key_tails("customer-7")] == [("billing", second.id)]


def test_a_resend_that_carries_its_key_keeps_its_place(published: list[dict[str, Any]]) -> None:
    # A retry (Celery's Task.retry) sends again with the request's headers, key included
    app, store = app_with_store()

    @celery_causal.causal_task(app, name="keys.t", shared=False, ordering_key=lambda: "k")
    def task() -> None: ...

    first = task.delay()
    second = task.delay()
    retried = task.apply_async(task_id=first.id, headers=dict(published[0]))
    assert retried.id == first.id
    assert published[-1].get("causal_follows") is None
    assert [t.task_id for t in store.key_tails("k")] == [second.id]


def test_send_task_by_name_records_the_key_too(published: list[dict[str, Any]]) -> None:
    app, _ = app_with_store()

    @celery_causal.causal_task(app, name="keys.t", shared=False)
    def task() -> None: ...

    first = app.send_task("keys.t", ordering_key="k")
    app.send_task("keys.t", ordering_key="k")
    assert [h.get("causal_follows") for h in published] == [None, first.id]


def test_bad_sends_under_a_key_are_refused_naming_the_problem() -> None:
    app, _ = app_with_store()

    @celery_causal.causal_task(app, name="keys.t", shared=False)
    def task() -> None: ...

    @celery_causal.causal_task(app, name="keys.numbered", shared=False, ordering_key=lambda: 7)
    def numbered() -> None: ...

    @app.task(name="keys.plain", shared=False)
    def plain() -> None: ...

    with pytest.raises(InvalidLeaderError, match=r"both follows= and ordering_key="):
        task.apply_async(follows="a", ordering_key="k")
    with pytest.raises(InvalidIdError, match=r"ordering_key of keys\.t"):
        task.apply_async(ordering_key="")
    with pytest.raises(InvalidIdError, match="must be a string, not int"):
        numbered.delay()
    with pytest.raises(NotCausalError, match="cannot wait for ordering_key='k'"):
        plain.apply_async(ordering_key="k")
    with pytest.raises(TypeError, match="ordering_key must be callable"):
        celery_causal.causal_task(app, name="keys.bad", ordering_key="k")  # type: ignore[arg-type]


def test_a_producer_without_install_cannot_send_under_a_key() -> None:
    app = Celery("bare", broker="memory://", set_as_current=False)

    @app.task(name="keys.t", base=celery_causal.CausalTask, shared=False)
    def task() -> None: ...

    with pytest.raises(NotInstalledError, match="install"):
        task.apply_async(ordering_key="k")


def test_eager_sends_under_a_key_run_in_send_order_and_free_the_key() -> None:
    app, store = app_with_store(task_always_eager=True)
    ran: list[int] = []

    @celery_causal.causal_task(app, name="keys.t", shared=False, ordering_key=lambda n: "k")
    def task(n: int) -> int:
        ran.append(n)
        return n

    assert [task.delay(n).get() for n in range(3)] == [0, 1, 2]
    assert ran == [0, 1, 2]
    assert store.key_tails("k") == []


def test_a_keyed_task_sent_again_after_it_ran_does_not_hold_its_key() -> None:
    # A producer re-sends a finished task's id (its first publish timed out, say): the
    # send makes it the key's newest task again, and its delivery is a duplicate
    app, store = app_with_store(task_always_eager=True, causal_seen_cache_size=0)

    @celery_causal.causal_task(app, name="keys.t", shared=False)
    def task(label: str) -> str:
        return label

    assert task.apply_async(("t1",), task_id="t1", ordering_key="k").state == "SUCCESS"
    assert task.apply_async(("t1",), task_id="t1", ordering_key="k").state == "IGNORED"
    assert store.key_tails("k") == []
    age(store, 2 * 3600)  # long after: t1's record is over
    assert task.apply_async(("t2",), task_id="t2", ordering_key="k").state == "SUCCESS"


def test_apply_orders_by_key_as_apply_async_does() -> None:
    app, store = app_with_store()

    @celery_causal.causal_task(app, name="keys.t", shared=False)
    def task() -> None: ...

    store.record_key("default", "k", "earlier")  # the key's newest task has not run
    assert task.apply(ordering_key="k").state == DEFERRED


def test_a_fan_in_send_needs_no_install_as_a_single_follows_send_does_not(
    published: list[dict[str, Any]],
) -> None:
    app = Celery("bare-fan-in", broker="memory://", set_as_current=False)

    @app.task(name="keys.report", base=celery_causal.CausalTask, shared=False)
    def report() -> None: ...

    report.apply_async(follows="a")
    report.apply_async(follows=["a", "b"])
    assert [h["causal_follows"] for h in published] == ["a", ["a", "b"]]
