"""The worker's main process holds a follower whose leader is running in the same worker.

A follower delivered while its leader runs in another pool process of the same worker would
otherwise park: stored, acked, then published and delivered again once the leader succeeds
(two deliveries, three more store statements). The main process hands every causal task to
its pool itself and hears from the pool when each one finished, so it can tell that the
leader is in this worker; it then holds the follower's request, its message unacked as in
the pool's own queue, and hands it to the pool when the leader finished, or after
``causal_local_hold`` seconds, whichever comes first.

A follower delivered just *before* its leader (sent in the same burst, last link first, or
overtaken on the way) would park too, though its leader reaches the worker a moment later.
Such a follower is held for up to ``causal_local_lookahead`` seconds in case its leader
comes (at most one such follower per pool process); when it does, the follower waits
behind it as above. A follower whose leader
finished in this worker (among the last :attr:`LocalHolds.GONE_KEPT` tasks here) is handed
over at once: there is nothing left to wait for here.

Why this cannot break the order: holding only delays a hand-over. The pool process checks
the follower against the store exactly as it would have, so whatever the leader's outcome
(success, failure, retry, revocation, a lost process) the follower runs, parks or fails as
the store allows. A completion or an arrival this module misses costs at most the hold's
limit.

Why nothing is lost: a held message is unacked and listed in the worker's reserved requests
(``celery inspect reserved``). If the broker connection drops, Celery forgets its reserved
requests (their delivery tags died with the channel) and the broker delivers them again; a
held request no longer reserved is dropped here, never run. A worker killed while holding
leaves the messages unacked, and the broker delivers them again.

It runs only where it needs no lock: a prefork pool driven by the worker's event loop (a
transport with asynchronous I/O: Redis, RabbitMQ), whose one thread receives messages, hands
them to the pool, gets the pool's results, fires timers and sends the ``task_revoked`` signal.
Elsewhere Celery's own strategy runs unchanged.

It relies on these Celery internals, checked by CI against the oldest and the newest Celery
the package admits: a task's ``Strategy`` (a documented hook) builds its request class with
the pool's ``apply_async`` read from the consumer it is given, and hands a request over
through ``consumer.on_task_request``; the pool calls ``callback`` or ``error_callback`` once
for each task it was given.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

from celery import signals
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy

from .errors import ConfigurationError
from .payload import FOLLOWS, RELEASED
from .settings import CausalSettings

logger = logging.getLogger("celery_causal")

_holds: weakref.WeakKeyDictionary[Any, LocalHolds] = weakref.WeakKeyDictionary()


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``CausalTask.Strategy``: Celery's default strategy, handing requests over through
    the consumer's :class:`LocalHolds` where holding applies."""
    holds = _holds_for(app, consumer)
    return default_strategy(task, app, holds.view if holds else consumer, **kwargs)


def _holds_for(app: Any, consumer: Any) -> LocalHolds | None:
    try:
        settings = CausalSettings.from_conf(app.conf)
    except ConfigurationError:
        return None  # the worker's start-up step stops the worker with the message
    limit = settings.local_hold
    if (
        limit <= 0
        or getattr(consumer, "hub", None) is None
        or not isinstance(getattr(consumer, "pool", None), PreforkPool)
    ):
        return None
    holds = _holds.get(consumer)
    # One per consumer, shared by every causal task's strategy (a leader and its follower
    # may be different tasks); built again when the consumer's pool or hand-over changed.
    if holds is None or not holds.serves(consumer):
        holds = _holds[consumer] = LocalHolds(consumer, limit, settings.local_lookahead)
        signals.task_revoked.connect(_on_revoked, weak=False, dispatch_uid=__name__)
    return holds


class LocalHolds:
    """The causal tasks this worker's main process handed to its pool and has not heard
    back from, and the followers held behind each."""

    PRUNE_EVERY = 256
    GONE_KEPT = 10_000

    def __init__(self, consumer: Any, limit: float, lookahead: float = 0) -> None:
        self._consumer = consumer
        self._pool = consumer.pool
        self._hand_over = consumer.on_task_request
        self._call_after = consumer.timer.call_after
        self._limit = limit
        self._lookahead = min(lookahead, limit)
        #: Task id of a request handed to the pool or held -> the followers held behind it.
        self._behind: dict[str, list[Any]] = {}
        #: Task id -> the request noted under it here (for a task that reached the pool
        #: without this module's hand-over, the request that gave the pool its callback).
        self._requests: dict[str, Any] = {}
        #: Task id not here yet -> the followers held in case it is about to be delivered.
        self._expected: dict[str, list[Any]] = {}
        #: Held request -> the task id it waits for, and its hold's timer entry.
        self._held: dict[Any, tuple[str, Any]] = {}
        #: Task ids that were here and are not any more, newest last (a bounded window).
        self._gone: dict[str, None] = {}
        self._notes = 0
        #: Followers of finished tasks still to hand over or hold again, and whether the
        #: loop that does so is running.
        self._released: deque[tuple[Any, bool]] = deque()
        self._releasing = False
        self.view = _ConsumerView(consumer, self)

    def serves(self, consumer: Any) -> bool:
        return consumer.pool is self._pool and consumer.on_task_request is self._hand_over

    @property
    def held(self) -> int:
        """Requests held now."""
        return len(self._held)

    @property
    def noted(self) -> int:
        """Task ids noted as handed to the pool or held."""
        return len(self._behind)

    def on_task_request(self, request: Any) -> None:
        if self._held and not (self._room_to_hold() and self._room_to_look_ahead()):
            # Held requests the worker forgot keep their places until pruned; on Celery
            # 5.5 a closed connection also cleared their timers.
            self.prune()
        awaited = self._awaited(request)
        # A copy is held even without room: handed over, it could run beside the first.
        if awaited is not None and (awaited == request.id or self._room_to_hold()):
            self._hold(request, awaited, self._behind, self._limit)
            return
        expected = self._expected_leader(request) if awaited is None else None
        if expected is not None and self._room_to_look_ahead():
            self._hold(request, expected, self._expected, self._lookahead)
        else:
            self._dispatch(request)

    def _room_to_look_ahead(self) -> bool:
        """Whether one more follower may wait for a leader not here yet: at most one per
        pool process. A chain delivered last link first needs one (its newest link; the
        others wait behind a link that is here), and followers whose leaders ran on other
        workers, which wait the whole lookahead for nothing, keep at most that many places
        of the prefetch window from the pool."""
        expecting = sum(map(len, self._expected.values()))
        return expecting < self._processes() and self._room_to_hold()

    def _room_to_hold(self) -> bool:
        """Whether one more held request leaves the pool its share of the prefetch window.

        A held message is unacked, so it takes a place in the window the broker fills: held
        requests never take the places of as many messages as there are pool processes, or
        an idle process would wait for the hold while unrelated tasks stay in the queue.
        With ``worker_disable_prefetch`` the worker fetches only while it reserves fewer
        requests than it has processes: nothing is held.
        """
        consumer = self._consumer
        if consumer.app.conf.get("worker_disable_prefetch"):
            return False
        window = getattr(getattr(consumer, "qos", None), "value", 0) or 0
        if window <= 0:
            return True  # no prefetch limit: a held message keeps no other one out
        return len(self._held) < window - self._processes()

    def _processes(self) -> int:
        controller = getattr(self._consumer, "controller", None)
        processes = getattr(controller, "max_concurrency", None) or self._pool.num_processes
        return int(processes or 0)

    def prune(self) -> None:
        """Forget the requests the worker forgot (its connection closed: the broker delivers
        them again), held ones included, and hand over what waited behind them. Run every
        :attr:`PRUNE_EVERY` requests noted, so that a worker whose connection drops now and
        then keeps no message of its past connections."""
        reserved = worker_state.reserved_requests
        for request in [r for r in self._held if r not in reserved]:
            self._unhold(request)[1].cancel()
        for task_id, request in list(self._requests.items()):
            if request not in reserved and self._requests.get(task_id) is request:
                self._finished(task_id)

    def apply_async(self, target: Any, *args: Any, **options: Any) -> Any:
        """The pool's ``apply_async``, noting the task until the pool reports it finished."""
        task_id = options.get("correlation_id")
        if not isinstance(task_id, str):
            return self._pool.apply_async(target, *args, **options)
        # Requests that reach the pool without this module's hand-over (after an ETA, or
        # a rate limit) are noted here, with their request: when the connection closes,
        # the pool discards the tasks no process accepted yet without a callback, and the
        # worker's forgetting the request must end the note too.
        if task_id not in self._behind:
            self._behind[task_id] = []
            # The request hands the pool its own bound ``on_success`` as the callback.
            request = getattr(options.get("callback"), "__self__", None)
            if getattr(request, "id", None) == task_id:
                self._requests[task_id] = request
            self._arrived(task_id)
        for name in ("callback", "error_callback"):
            options[name] = self._then_finish(options.get(name), task_id)
        return self._pool.apply_async(target, *args, **options)

    def _then_finish(self, callback: Any, task_id: str) -> Any:
        def finished(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs) if callback is not None else None
            finally:
                self._finished(task_id)

        return finished

    def _here(self, task_id: str) -> bool:
        """Whether ``task_id`` runs, waits for a pool process, or is held in this worker.

        A request the worker forgot (its connection closed: Celery drops the requests it
        reserved, and the broker delivers them again, here or elsewhere) is forgotten here
        too, and whatever waited behind it is handed over.
        """
        if task_id not in self._behind:
            return False
        request = self._requests.get(task_id)
        if request is None or request in worker_state.reserved_requests:
            return True
        self._finished(task_id)
        return False

    def _awaited(self, request: Any) -> str | None:
        """The task id ``request`` must wait for in this worker, if any.

        Another copy of the same task (an outbox replaying a send, a broker redelivery)
        comes first: handed over together, both copies would find the leader done and their
        own id not yet, and both would run. Handed over after it, a copy finds it done.
        """
        if self._here(request.id) and not self._noted_as(request):
            return str(request.id)
        return self._leader_here(request)

    def _leader_here(self, request: Any) -> str | None:
        """A leader of ``request`` (other than itself) that this worker runs or holds."""
        return next((x for x in _leaders(request) if self._here(x)), None)

    def _expected_leader(self, request: Any) -> str | None:
        """A leader of ``request`` that has not reached this worker, if it is to be waited
        for: a follower delivered just before its leader (sent in the same burst, or
        overtaken on the way) finds it here a moment later, where a handed-over follower
        would park. None for a leader that finished here, and with no lookahead."""
        if self._lookahead <= 0 or (request.request_dict or {}).get(RELEASED):
            return None  # a released follower's leader finished, here or elsewhere
        return next((x for x in _leaders(request) if x not in self._gone), None)

    def _noted_as(self, request: Any) -> bool:
        """Whether ``request`` is the one noted under its task id (not another copy)."""
        return self._requests.get(request.id) is request

    def _note(self, request: Any) -> None:
        if request.id not in self._behind:
            self._behind[request.id] = []
            self._requests[request.id] = request
            self._arrived(request.id)
            self._notes += 1
            if self._notes % self.PRUNE_EVERY == 0:
                self.prune()

    def _arrived(self, task_id: str) -> None:
        """``task_id`` is here now: the followers expecting it wait behind it, with the
        hold's whole limit from now."""
        for follower in self._expected.pop(task_id, ()):
            # A prune run by a note inside this loop may have dropped a later follower.
            held = self._held.pop(follower, None)
            if held is not None:
                held[1].cancel()
                self._hold(follower, task_id, self._behind, self._limit)

    def _hold(self, request: Any, awaited: str, lists: dict[str, list[Any]], limit: float) -> None:
        entry = self._call_after(limit, self._hold_expired, (request,))
        lists.setdefault(awaited, []).append(request)
        self._held[request] = (awaited, entry)
        self._note(request)  # its own followers, delivered while it is held, wait behind it

    def _unhold(self, request: Any) -> tuple[str, Any]:
        """Take a held ``request`` off the lists; its task id and timer entry."""
        awaited, entry = self._held.pop(request)
        for lists in (self._behind, self._expected):
            waiting = lists.get(awaited)
            if waiting is not None and request in waiting:
                waiting.remove(request)
                if not waiting and lists is self._expected:
                    del lists[awaited]
        return awaited, entry

    def _hold_expired(self, request: Any) -> None:
        held = self._held.get(request)
        if held is None:
            return  # handed over when its leader finished
        first = self._requests.get(request.id)
        if held[0] == request.id and first is not request and first in self._held:
            # A later copy never goes before the first one: the first one's hold restarted
            # when its leader arrived, and the store tells copies apart only once one of
            # them finished.
            entry = self._call_after(self._limit, self._hold_expired, (request,))
            self._held[request] = (held[0], entry)
            return
        self._unhold(request)
        self._dispatch_logged(request)

    def _dispatch(self, request: Any) -> None:
        if request not in worker_state.reserved_requests:
            # The connection its message came on closed: the broker delivers it again.
            if self._noted_as(request):
                self._finished(request.id)
            return
        # Noted from here, not from the pool's apply_async: the worker may keep a request
        # until a pool process is free, and a follower delivered meanwhile waits behind it.
        self._note(request)
        self._hand_over(request)

    def _dispatch_logged(self, request: Any) -> None:
        # Called from the pool's result callbacks and the timer: one hand-over that fails
        # must neither stop the others nor reach the pool's result handling. Its message
        # goes back to the broker, to be delivered again.
        try:
            self._dispatch(request)
        except Exception:
            logger.exception("could not hand task %s to the pool; requeued", request.id)
            try:
                request.reject(requeue=True)
            finally:
                worker_state.task_ready(request)
                if self._noted_as(request):
                    self._finished(request.id)

    def revoked(self, task_id: str) -> None:
        """A request found revoked when handed over never reaches the pool."""
        self._finished(task_id)

    def _finished(self, task_id: str) -> None:
        self._requests.pop(task_id, None)
        self._gone.pop(task_id, None)
        self._gone[task_id] = None
        if len(self._gone) > self.GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        # Followers expecting a task that will not come (revoked before it reached the
        # pool) are handed over as well.
        expected = self._expected.pop(task_id, [])
        self._released.extend((f, False) for f in self._behind.pop(task_id, []))
        self._released.extend((f, True) for f in expected)
        if self._releasing:
            return  # the loop below, further up the stack, takes them
        # A hand-over can end in another _finished (a revoked or forgotten follower, whose
        # own followers are next): a loop, not a recursion, so that a long held chain
        # cannot exhaust the stack half-way through and strand the rest of it.
        self._releasing = True
        try:
            while self._released:
                self._release(*self._released.popleft())
        finally:
            self._releasing = False

    def _release(self, follower: Any, was_expected: bool) -> None:
        held = self._held.pop(follower, None)
        if held is None:
            return
        awaited = self._awaited(follower)
        if awaited is None:
            held[1].cancel()
            self._dispatch_logged(follower)
            return
        if was_expected:  # its hold was the lookahead's: the limit from now
            held[1].cancel()
            self._hold(follower, awaited, self._behind, self._limit)
        else:  # another of its leaders, or another copy of it, is still here
            self._behind[awaited].append(follower)
            self._held[follower] = (awaited, held[1])
        # Noted under its id again if no other copy is: a later copy waits behind it.
        self._note(follower)


def _leaders(request: Any) -> list[str]:
    """The leaders ``request`` follows, itself left out."""
    follows = (request.request_dict or {}).get(FOLLOWS)
    leaders = [follows] if isinstance(follows, str) else follows
    if not isinstance(leaders, list):
        return []
    return [x for x in leaders if isinstance(x, str) and x != request.id]


def _on_revoked(request: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    if isinstance(task_id, str):
        for holds in list(_holds.values()):
            holds.revoked(task_id)


class _ConsumerView:
    """The consumer as :func:`celery.worker.strategy.default` sees it: requests are handed
    over through the holds, and reach the pool through them."""

    def __init__(self, consumer: Any, holds: LocalHolds) -> None:
        self._consumer = consumer
        self.on_task_request = holds.on_task_request
        self.pool = holds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)
