"""Send an order stream out of order and watch celery-causal put it back in causal order.

    python -m example_project.demo

Runs a worker in this process; with no environment set it needs no server at all
(in-memory broker, SQLite store). Exit status 0 when causal order held, 1 when it broke.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

from celery.contrib.testing.worker import start_worker

from celery_causal import signals
from celery_causal.registry import runtime_for
from example_project import shop
from example_project.stream import LEADS, STREAM, send, task_id

# Short enough that the lost follower is swept within the demo (settings are read on
# first use, so they can still change here).
LOOKBACK = float(os.environ.get("CAUSAL_LOOKBACK", 3))
shop.app.conf.update(causal_lookback=LOOKBACK, causal_seen_ttl=max(2 * LOOKBACK, 60))

RUN = uuid.uuid4().hex[:4]
#: The follower whose leader never comes (the stream's last event), as the log names it.
LOST_TASK = "order4-order_shipped"


def tid(order_id: int, event: str) -> str:
    return task_id(RUN, order_id, event)


class _Narrator:
    """Tells the demo's story from celery-causal's signals."""

    def __init__(self) -> None:
        self.deferred = self.released = self.swept = 0
        #: Set when the lost follower parked: its wait (causal_lookback) starts there.
        self.lost_parked = threading.Event()
        self.lost_parked_at = 0.0
        signals.follower_parked.connect(self.parked, weak=False)
        signals.follower_released.connect(self.released_one, weak=False)

    def close(self) -> None:
        signals.follower_parked.disconnect(self.parked)
        signals.follower_released.disconnect(self.released_one)

    @staticmethod
    def _ours(task_id: str) -> str | None:
        """The task's name in the story, or None for another run's task (a shared store)."""
        return task_id.removeprefix(f"{RUN}-") if task_id.startswith(f"{RUN}-") else None

    def parked(self, task_id: str, leader_id: str, **_: Any) -> None:
        task = self._ours(task_id)
        if task is None:
            return
        self.deferred += 1
        print(f"    deferred  {task} waits for {self._ours(leader_id)}", flush=True)
        if task == LOST_TASK:
            self.lost_parked_at = time.monotonic()
            self.lost_parked.set()

    def released_one(self, task_id: str, released_by: str, **_: Any) -> None:
        task = self._ours(task_id)
        if task is None:
            return
        if released_by == "leader":
            self.released += 1
        elif released_by == "sweep":
            self.swept += 1
            print(f"    swept     {task}: its leader never came", flush=True)


def _sweep_until_released(result: Any, narrator: _Narrator) -> None:
    """Sweep once the lost follower's lookback, counted from its park, has passed.

    Beat sweeps every causal_sweep_interval; here one sweep after the deadline does it (a
    second follows only if the store's clock ran a little behind this process's).
    """
    if not narrator.lost_parked.wait(30):
        raise RuntimeError("the lost follower never parked")
    time.sleep(max(0.0, narrator.lost_parked_at + LOOKBACK + 0.2 - time.monotonic()))
    give_up = time.monotonic() + 30
    while True:
        runtime_for(shop.app).sweep()  # what beat's sweep task runs, here in-process
        if result.ready() or time.monotonic() > give_up:
            return
        time.sleep(0.5)


def violations(ran: list[tuple[str, int]], lost: set[tuple[str, int]]) -> list[str]:
    position = {entry: i for i, entry in enumerate(ran)}
    problems = []
    for event, order in ran:
        leader = LEADS[event]
        if leader is None or (event, order) in lost:
            continue
        if (leader, order) not in position or position[(leader, order)] > position[(event, order)]:
            problems.append(f"{event} of order {order} ran before {leader}")
    return problems


#: Charges the demo sends per customer, in this order.
CHARGES = {1: [10, 20, 30], 2: [5, 15, 25]}


def _send_charges() -> list[Any]:
    """Send each customer's charges in order, the later ones delivered first (a shorter
    countdown): the ordering key puts them back in send order, per customer."""
    results = []
    for n in range(3):
        for customer, amounts in CHARGES.items():
            countdown = (2 - n) * 0.3
            task = f"{RUN}-charge-{customer}-{amounts[n]}"
            results.append(
                shop.charge.apply_async((customer, amounts[n]), task_id=task, countdown=countdown)
            )
    return results


LOADS = ("orders", "payments", "stock")


def _send_report() -> list[Any]:
    """The day's report first, then its three loads, a moment apart: the report waits for
    each load in turn and runs once the last one succeeded."""
    loads = {source: f"{RUN}-load-{source}" for source in LOADS}
    report = shop.daily_report.apply_async(
        ("2026-11-30",), task_id=f"{RUN}-report", follows=list(loads.values())
    )
    results = [report]
    for n, source in enumerate(LOADS):
        countdown = 0.3 * (n + 1)
        results.append(
            shop.load.apply_async(
                (source, "2026-11-30"), task_id=loads[source], countdown=countdown
            )
        )
    return results


def report_violations(task_ids: set[str]) -> list[str]:
    ran = [what for t, what in shop.reported if t in task_ids]
    if sorted(ran) != sorted(["report", *(f"load {s}" for s in LOADS)]) or ran[-1] != "report":
        return [f"the report and its loads ran as {ran}"]
    return []


def charge_violations(task_ids: set[str]) -> list[str]:
    problems = []
    for customer, amounts in CHARGES.items():
        ran = [a for t, c, a in shop.charged if c == customer and t in task_ids]
        if ran != amounts:
            problems.append(f"customer {customer} was charged {ran}, sent {amounts}")
    return problems


def main() -> int:
    if os.environ.get("CAUSAL_STORE_URL"):
        return _run()
    # A fresh embedded store per run, removed with it: rows of an earlier interrupted run
    # stay out of it, and nothing is left behind.
    with tempfile.TemporaryDirectory(prefix="celery-causal-demo-") as folder:
        shop.app.conf.causal_store_url = f"sqlite:///{os.path.join(folder, 'demo.sqlite3')}"
        try:
            return _run()
        finally:
            runtime_for(shop.app).store.close()


def _run() -> int:
    narrator = _Narrator()
    # The narrator tells the story; celery-causal's own lines would repeat it.
    logging.getLogger("celery_causal").setLevel(logging.ERROR)
    # kombu notes that memory:// has no host name; nothing to act on in a demo.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    started = time.monotonic()
    store = shop.app.conf.causal_store_url
    print(f"celery-causal demo: broker {shop.app.conf.broker_url}, store {store}\n")
    with start_worker(
        shop.app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30
    ):
        print("Events arrive out of order:")
        results = send(RUN, pause=0.05)
        for result in results[:-1]:
            result.get(timeout=30)
        print(
            f"\nWaiting {LOOKBACK:g}s (causal_lookback, counted from its park) for the lost "
            "follower, then sweeping (Celery beat does this every causal_sweep_interval):"
        )
        _sweep_until_released(results[-1], narrator)
        results[-1].get(timeout=30)
        print("\nCharges per customer, sent under an ordering key, the last delivered first:")
        charges = _send_charges()
        for result in charges:
            result.get(timeout=30)
        print("\nThe day's report, sent before the three loads it follows:")
        report = _send_report()
        for result in report:
            result.get(timeout=30)

    lost = {("order_shipped", 4)}
    # Only this run's tasks: a shared store may release an earlier run's lost followers.
    ran = [(e, o) for task_id, e, o in shop.ran if task_id.startswith(f"{RUN}-")]
    problems = (
        violations(ran, lost)
        + charge_violations({r.id for r in charges})
        + report_violations({r.id for r in report})
    )
    print("\nBodies ran in this order:")
    print("  " + ", ".join(f"{e}#{o}" for e, o in ran))
    for problem in problems:
        print(f"  ORDER VIOLATION: {problem}")
    print(
        f"\nSummary: tasks run {len(ran)}, deferred {narrator.deferred} and released "
        f"{narrator.released}, lost and swept {narrator.swept}, "
        f"order violations: {len(problems)} ({time.monotonic() - started:.1f}s)"
    )
    return 1 if problems or len(ran) != len(STREAM) else 0


if __name__ == "__main__":
    sys.exit(main())
