"""The bookkeeping of :class:`~celery_causal.holding.LocalHolds`, driven as the worker's
event loop drives it, with a pool that records what it was given. Real prefork workers
run it in tests/acceptance/test_local_hold.py; the paths here (a closed connection, a
follower of several leaders, a hold's limit firing) are hard to force there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state as worker_state

from celery_causal.holding import LocalHolds
from celery_causal.payload import FOLLOWS, RELEASED


class Request:
    """What LocalHolds reads of a worker request: its id and headers."""

    def __init__(self, task_id: str, follows: str | list[str] | None = None) -> None:
        self.id = task_id
        self.request_dict = {FOLLOWS: follows} if follows is not None else {}
        self.rejected: bool | None = None

    def reject(self, requeue: bool = False) -> None:
        self.rejected = requeue

    def on_success(self, *args: Any) -> None:
        """The pool's callback of this request."""

    def on_failure(self, *args: Any) -> None:
        """The pool's error callback of this request."""

    def __repr__(self) -> str:
        return f"Request({self.id})"


class Pool:
    num_processes = 2

    def __init__(self) -> None:
        self.running: dict[str, dict[str, Any]] = {}

    def apply_async(self, target: Any, **options: Any) -> None:
        self.running[options["correlation_id"]] = options

    def finish(self, task_id: str, ok: bool = True) -> None:
        options = self.running.pop(task_id)
        options["callback" if ok else "error_callback"]((False, task_id, 0.0))


class Entry:
    """A timer entry: the hold's limit, which the test fires by hand."""

    def __init__(self, secs: float, fun: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.secs, self.fun, self.args, self.cancelled = secs, fun, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.fun(*self.args)


class Consumer:
    """The consumer's hand-over sends a request straight to the pool, as the worker does
    through the request's ``execute_using_pool``, unless it was revoked."""

    def __init__(self) -> None:
        self.pool = Pool()
        self.timers: list[Entry] = []
        self.fail_hand_over: set[str] = set()
        self.app = SimpleNamespace(conf={})
        self.qos = SimpleNamespace(value=0)  # the prefetch window; 0: no limit
        self.controller = SimpleNamespace(max_concurrency=None)
        self.revoked: set[str] = set()
        self.holds: LocalHolds | None = None
        self.timer = self

    def call_after(self, secs: float, fun: Callable[..., None], args: tuple[Any, ...]) -> Entry:
        entry = Entry(secs, fun, args)
        self.timers.append(entry)
        return entry

    def on_task_request(self, request: Request) -> None:
        if request.id in self.fail_hand_over:
            raise RuntimeError("the pool is closing")
        if request.id in self.revoked:
            return
        assert self.holds is not None
        # As Celery's Request.execute_using_pool: its bound methods are the callbacks
        self.holds.view.pool.apply_async(
            None,
            correlation_id=request.id,
            callback=request.on_success,
            error_callback=request.on_failure,
        )


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    c = Consumer()
    c.holds = LocalHolds(c, 1.0)
    yield c
    worker_state.reserved_requests.clear()


def deliver(c: Consumer, task_id: str, follows: str | list[str] | None = None) -> Request:
    request = Request(task_id, follows)
    worker_state.reserved_requests.add(request)  # the default strategy's task_reserved
    assert c.holds is not None
    c.holds.view.on_task_request(request)
    return request


def test_a_follower_waits_for_its_leader_then_each_link_of_a_chain_in_turn(
    consumer: Consumer,
) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    deliver(consumer, "c", "b")
    assert set(consumer.pool.running) == {"a"}
    consumer.pool.finish("a")
    assert set(consumer.pool.running) == {"b"}
    consumer.pool.finish("b", ok=False)  # a failure hands over too: the pool checks it
    assert set(consumer.pool.running) == {"c"}
    consumer.pool.finish("c")
    assert consumer.holds is not None and consumer.holds.held == 0


def test_a_follower_of_several_leaders_waits_for_each_that_runs_here(
    consumer: Consumer,
) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b")
    deliver(consumer, "f", ["a", "elsewhere", "b"])
    consumer.pool.finish("a")
    assert set(consumer.pool.running) == {"b"}
    consumer.pool.finish("b")
    assert set(consumer.pool.running) == {"f"}


def test_a_follower_of_a_leader_not_here_is_handed_over_at_once(consumer: Consumer) -> None:
    deliver(consumer, "f", "elsewhere")
    deliver(consumer, "g", ["x", "y"])
    assert set(consumer.pool.running) == {"f", "g"}


def test_the_hold_limit_hands_a_follower_over_while_its_leader_still_runs(
    consumer: Consumer,
) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    [entry] = consumer.timers
    assert entry.secs == 1.0
    entry.fire()
    assert set(consumer.pool.running) == {"a", "b"}
    consumer.pool.finish("a")  # b is not handed over a second time
    assert set(consumer.pool.running) == {"b"}


def test_a_follower_whose_connection_closed_is_dropped_not_run(consumer: Consumer) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    deliver(consumer, "c", "b")
    # The consumer's on_close forgets what it reserved: the broker delivers it again
    worker_state.reserved_requests.clear()
    consumer.pool.finish("a")
    assert consumer.pool.running == {}
    assert consumer.holds is not None and consumer.holds.held == 0


def test_a_revoked_follower_hands_its_own_followers_over(consumer: Consumer) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    deliver(consumer, "c", "b")
    consumer.revoked.add("b")
    consumer.pool.finish("a")  # b is refused by the hand-over, c still waits for it
    assert consumer.pool.running == {}
    assert consumer.holds is not None
    consumer.holds.revoked("b")  # the task_revoked signal of b's hand-over
    assert set(consumer.pool.running) == {"c"}


def test_a_task_that_reaches_the_pool_without_a_hand_over_is_waited_for(
    consumer: Consumer,
) -> None:
    # A task after its ETA goes from the consumer's timer straight to the pool
    eta = Request("eta")
    worker_state.reserved_requests.add(eta)  # reserved when it was received
    consumer.on_task_request(eta)
    deliver(consumer, "f", "eta")
    assert set(consumer.pool.running) == {"eta"}
    consumer.pool.finish("eta")
    assert set(consumer.pool.running) == {"f"}


def test_a_second_copy_of_a_task_waits_for_the_first(consumer: Consumer) -> None:
    # Two copies of follower b held behind leader a: handed over together, both would run
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    deliver(consumer, "b", "a")
    deliver(consumer, "b", "a")
    consumer.pool.finish("a")
    assert set(consumer.pool.running) == {"b"}
    consumer.pool.finish("b")  # the next copy now finds b done in the store
    assert set(consumer.pool.running) == {"b"}
    consumer.pool.finish("b")
    assert set(consumer.pool.running) == {"b"}
    consumer.pool.finish("b")
    assert consumer.holds is not None and consumer.holds.held == 0
    assert consumer.holds.noted == 0


def test_a_follower_listing_itself_among_its_leaders_waits_only_for_the_others(
    consumer: Consumer,
) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", ["a", "b"])
    consumer.pool.finish("a")
    assert set(consumer.pool.running) == {"b"}
    assert not [e for e in consumer.timers if not e.cancelled]


def test_a_leader_forgotten_with_its_connection_holds_nobody_back(consumer: Consumer) -> None:
    # Both pool processes busy: a waits for one (noted here), f is held behind a
    consumer.revoked.add("a")  # stands for "not yet handed to a pool process"
    a = deliver(consumer, "a")
    f = deliver(consumer, "f", "a")
    # The connection closes: Celery forgets both; the broker delivers them again
    worker_state.reserved_requests.discard(a)
    worker_state.reserved_requests.discard(f)
    # A later follower of a is not held behind a request the worker forgot
    deliver(consumer, "g", "a")
    assert set(consumer.pool.running) == {"g"}
    assert consumer.holds is not None and consumer.holds.held == 0


def test_a_follower_whose_hand_over_fails_goes_back_to_the_broker(consumer: Consumer) -> None:
    deliver(consumer, "a")
    b = deliver(consumer, "b", "a")
    deliver(consumer, "c", "b")
    consumer.fail_hand_over.add("b")
    consumer.pool.finish("a")  # b's hand-over fails: requeued, and c no longer waits for it
    assert b.rejected is True and b not in worker_state.reserved_requests
    assert set(consumer.pool.running) == {"c"}


def test_a_hold_handed_over_early_cancels_its_timer(consumer: Consumer) -> None:
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    consumer.pool.finish("a")
    [entry] = consumer.timers
    assert entry.cancelled


def test_held_requests_leave_the_pool_its_share_of_the_prefetch_window(
    consumer: Consumer,
) -> None:
    # A window of 4 messages and 2 pool processes: at most 2 held
    consumer.qos.value = 4
    deliver(consumer, "a")
    for name in ("b", "c", "d"):
        deliver(consumer, name, "a")
    assert consumer.holds is not None and consumer.holds.held == 2
    assert set(consumer.pool.running) == {"a", "d"}  # d parks in its pool process
    consumer.pool.finish("a")
    assert set(consumer.pool.running) == {"b", "c", "d"}


def test_nothing_is_held_when_the_worker_fetches_only_for_idle_processes(
    consumer: Consumer,
) -> None:
    consumer.app.conf["worker_disable_prefetch"] = True
    deliver(consumer, "a")
    deliver(consumer, "b", "a")
    assert set(consumer.pool.running) == {"a", "b"}


def test_pruning_forgets_what_a_closed_connection_took_held_requests_included(
    consumer: Consumer,
) -> None:
    # a waits for a pool process, f is held behind it; on Celery 5.5 the connection's
    # close also clears the worker's timers, so f's hold would never end
    consumer.revoked.add("a")  # stands for "not yet handed to a pool process"
    a = deliver(consumer, "a")
    f = deliver(consumer, "f", "a")
    worker_state.reserved_requests.discard(a)
    worker_state.reserved_requests.discard(f)
    assert consumer.holds is not None
    consumer.holds.prune()
    assert consumer.holds.held == 0 and consumer.holds.noted == 0
    assert consumer.pool.running == {}


@pytest.fixture
def looking_ahead() -> Iterator[Consumer]:
    """Holds with a lookahead: a follower whose leader is not here waits 0.05 s for it."""
    c = Consumer()
    c.holds = LocalHolds(c, 1.0, 0.05)
    yield c
    worker_state.reserved_requests.clear()


def test_a_chain_delivered_last_link_first_runs_link_by_link_without_a_park(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "c", "b")
    assert [e.secs for e in c.timers] == [0.05]
    deliver(c, "b", "a")
    # b is here, held: c waits behind it now; b waits for a
    assert c.pool.running == {}
    assert sorted(e.secs for e in c.timers if not e.cancelled) == [0.05, 1.0]
    deliver(c, "a")
    # The leader came: each held link now waits behind it with the hold's whole limit
    assert set(c.pool.running) == {"a"}
    assert sorted(e.secs for e in c.timers if not e.cancelled) == [1.0, 1.0]
    c.pool.finish("a")
    assert set(c.pool.running) == {"b"}
    c.pool.finish("b")
    assert set(c.pool.running) == {"c"}
    c.pool.finish("c")
    assert c.holds is not None and c.holds.held == 0 and c.holds.noted == 0


def test_a_leader_that_does_not_come_costs_the_lookahead_only(looking_ahead: Consumer) -> None:
    c = looking_ahead
    deliver(c, "f", "elsewhere")
    [entry] = c.timers
    assert entry.secs == 0.05 and c.pool.running == {}
    entry.fire()
    assert set(c.pool.running) == {"f"}
    deliver(c, "elsewhere")  # arriving later, it finds nobody waiting for it
    assert set(c.pool.running) == {"f", "elsewhere"}


def test_a_follower_whose_leader_finished_here_is_handed_over_at_once(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "a")
    c.pool.finish("a")
    deliver(c, "f", "a")
    deliver(c, "g", ["a", "f"])  # f is running here: g waits behind it
    assert set(c.pool.running) == {"f"}
    assert [e.secs for e in c.timers] == [1.0]


def test_a_leader_revoked_before_it_reaches_the_pool_hands_its_expected_followers_over(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", "a")
    assert c.holds is not None
    c.holds.revoked("a")  # the strategy found a revoked: task_revoked, no hand-over
    assert set(c.pool.running) == {"f"}
    assert c.holds.held == 0


def test_a_leader_reaching_the_pool_after_its_eta_is_expected_too(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", "eta")
    eta = Request("eta")
    worker_state.reserved_requests.add(eta)
    c.on_task_request(eta)  # from the consumer's timer straight to the pool
    assert set(c.pool.running) == {"eta"}
    c.pool.finish("eta")
    assert set(c.pool.running) == {"f"}


def test_expected_followers_leave_the_pool_its_share_of_the_prefetch_window(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    c.qos.value = 4
    for name in ("w", "x", "y"):
        deliver(c, name, "a")
    assert c.holds is not None and c.holds.held == 2
    assert set(c.pool.running) == {"y"}


def test_pruning_forgets_expected_followers_whose_connection_closed(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    f = deliver(c, "f", "a")
    worker_state.reserved_requests.discard(f)
    assert c.holds is not None
    c.holds.prune()
    assert c.holds.held == 0 and [e.cancelled for e in c.timers] == [True]
    deliver(c, "a")
    c.pool.finish("a")
    assert set(c.pool.running) == set()  # f was not run: the broker delivers it again


def test_the_lookahead_is_never_longer_than_the_hold() -> None:
    c = Consumer()
    c.holds = LocalHolds(c, 0.2, 5.0)
    deliver(c, "f", "a")
    assert [e.secs for e in c.timers] == [0.2]


def test_a_later_copy_never_goes_before_the_first_whose_leader_arrived_late(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", "a")  # the first copy waits for a
    second = deliver(c, "f", "a")  # the second waits behind the first, its limit running
    deliver(c, "a")  # the first copy's hold restarts with the limit behind a
    for entry in [e for e in c.timers if e.args == (second,) and not e.cancelled]:
        entry.fire()  # the second copy's limit comes first: it keeps waiting
    assert set(c.pool.running) == {"a"}
    c.pool.finish("a")
    assert set(c.pool.running) == {"f"}
    c.pool.finish("f")  # now the second copy is handed over, and finds f done
    assert set(c.pool.running) == {"f"}


def test_a_prune_while_followers_move_behind_their_leader_loses_none(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    holds = c.holds
    assert holds is not None
    f = deliver(c, "f", "a")
    g = deliver(c, "g", "a")
    # The connection closes: both are forgotten; f's id is forgotten when h asks for it
    worker_state.reserved_requests.discard(f)
    worker_state.reserved_requests.discard(g)
    deliver(c, "h", "f")
    # The next note (f's own, noted again as a arrives) is the one that prunes
    n = 0
    while (holds._notes + 1) % holds.PRUNE_EVERY:
        deliver(c, f"x{n}")
        n += 1
    deliver(c, "a")  # a prune runs between the two followers of a moved behind it
    c.pool.finish("a")
    assert "f" not in c.pool.running and "g" not in c.pool.running
    assert holds.held == 0 and "h" in c.pool.running  # h found f's id gone: not held


def test_a_follower_expecting_a_revoked_leader_waits_behind_another_with_the_limit(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", ["a", "b"])
    deliver(c, "b")
    assert c.holds is not None
    c.holds.revoked("a")
    [entry] = [e for e in c.timers if not e.cancelled and e.args[0].id == "f"]
    assert entry.secs == 1.0
    c.pool.finish("b")
    assert set(c.pool.running) == {"f"}


def test_a_released_follower_is_not_held_for_a_leader_that_finished_elsewhere(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    request = Request("f", "ran-on-another-node")
    request.request_dict[RELEASED] = "leader"
    worker_state.reserved_requests.add(request)
    assert c.holds is not None
    c.holds.view.on_task_request(request)
    assert set(c.pool.running) == {"f"}


def test_a_task_the_pool_discarded_with_the_connection_holds_nobody_back(
    consumer: Consumer,
) -> None:
    # A task after its ETA reaches the pool without a hand-over; the connection closes
    # before a process accepted it: the worker forgets it and the pool drops it, no callback
    eta = Request("eta")
    worker_state.reserved_requests.add(eta)
    consumer.on_task_request(eta)
    worker_state.reserved_requests.discard(eta)
    deliver(consumer, "f", "eta")
    assert set(consumer.pool.running) == {"eta", "f"}


def test_no_more_followers_wait_for_leaders_not_here_than_there_are_pool_processes(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", "a")
    deliver(c, "g", "b")
    deliver(c, "h", "c")  # two pool processes: two followers look ahead, the third goes on
    assert set(c.pool.running) == {"h"}
    deliver(c, "e", "f")  # f is here (held): e waits behind it, whatever the lookahead
    assert c.holds is not None and c.holds.held == 3


class RevokingConsumer(Consumer):
    """As Celery: a request found revoked at its hand-over sends ``task_revoked`` from
    inside the hand-over, and the signal logs and swallows a receiver's exception."""

    def on_task_request(self, request: Request) -> None:
        if request.id not in self.revoked:
            super().on_task_request(request)
            return
        worker_state.task_ready(request)
        try:
            assert self.holds is not None
            self.holds.revoked(request.id)
        except Exception:  # celery.utils.dispatch.Signal.send
            pass


def test_a_follower_behind_a_long_chain_of_revoked_followers_is_handed_over() -> None:
    # No prefetch limit: the window holds a chain longer than Python's stack is deep
    c = RevokingConsumer()
    c.holds = LocalHolds(c, 1.0)
    try:
        deliver(c, "a")
        previous = "a"
        for i in range(1500):
            deliver(c, f"b{i}", previous)
            c.revoked.add(f"b{i}")
            previous = f"b{i}"
        deliver(c, "c", previous)
        c.pool.finish("a")
        assert set(c.pool.running) == {"c"}
        assert c.holds.held == 0
    finally:
        worker_state.reserved_requests.clear()


def test_a_connection_lost_under_a_long_held_chain_lets_the_leader_in_again(
    consumer: Consumer,
) -> None:
    deliver(consumer, "a")
    previous = "a"
    for i in range(1500):
        deliver(consumer, f"b{i}", previous)
        previous = f"b{i}"
    worker_state.reserved_requests.clear()  # the connection closed
    consumer.pool.running.clear()  # the pool dropped a, not yet accepted, without callback
    deliver(consumer, "a")  # delivered again: the whole forgotten chain is let go
    assert set(consumer.pool.running) == {"a"}
    assert consumer.holds is not None and consumer.holds.held == 0


def test_a_copy_moved_behind_a_leader_still_holds_later_copies_back(consumer: Consumer) -> None:
    consumer.qos.value = 4  # two pool processes: room for two held
    deliver(consumer, "a")
    deliver(consumer, "f", "a")  # the first copy, held behind a
    second = deliver(consumer, "f", "a")  # held behind the first
    consumer.timers[0].fire()  # the first copy's limit: handed over while a runs (parks)
    consumer.pool.finish("f")  # the second copy now waits behind a
    deliver(consumer, "x", "a")  # takes the last place
    deliver(consumer, "f", "a")  # a third copy waits behind the second, not in the pool
    assert consumer.holds is not None and second in consumer.holds._held
    assert "f" not in consumer.pool.running


def test_requests_forgotten_with_a_connection_whose_timers_were_cleared_free_their_places(
    looking_ahead: Consumer,
) -> None:
    c = looking_ahead
    deliver(c, "f", "x")
    deliver(c, "g", "y")  # two pool processes: both look ahead
    # Celery 5.5 closing a connection: reserved requests forgotten, timers cleared
    worker_state.reserved_requests.clear()
    c.timers.clear()
    h = deliver(c, "h", "z")
    assert c.holds is not None and c.holds.held == 1
    assert [e.args for e in c.timers] == [(h,)]
