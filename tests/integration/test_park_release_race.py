"""The park/release race (the seed's flaw #20381), forced with threads on every store.

A follower checks "leader not done"; meanwhile the leader, on another worker, records
itself done and claims its followers. Whichever order the steps take, the follower must
run exactly once and promptly: either its park takes the row back (LEADER_DONE) or the
leader's claim publishes it. Never both, never neither (stranded until the sweep).
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import pytest

from celery_causal.store import CausalStore, ParkOutcome
from tests.helpers import follower

TTL = 1800.0


def _run_pair(store: CausalStore, fid: str, leader: str, order: list[str]) -> Counter[str]:
    """Run follower and leader on two threads; ``order`` forces where they interleave."""
    runs: Counter[str] = Counter()
    follower_checked = threading.Event()
    leader_finished = threading.Event()
    follower_parked = threading.Event()

    def follower_side() -> None:
        if leader in store.lookup("default", [leader], TTL).done:
            runs[fid] += 1
            return
        follower_checked.set()
        if order == ["check", "leader", "park"]:
            assert leader_finished.wait(10)
        if store.park(follower(fid, leader), TTL) is ParkOutcome.LEADER_DONE:
            runs[fid] += 1
        follower_parked.set()

    def leader_side() -> None:
        assert follower_checked.wait(10)
        if order == ["check", "park", "leader"]:
            assert follower_parked.wait(10)
        if store.record_done("default", leader):  # the runtime claims only then
            for claimed in store.claim_followers("default", leader, 100):
                runs[claimed.follower_id] += 1
                store.finish([claimed.row_id])
        leader_finished.set()

    threads = [threading.Thread(target=follower_side), threading.Thread(target=leader_side)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return runs


@pytest.mark.parametrize(
    "order",
    [["check", "leader", "park"], ["check", "park", "leader"]],
    ids=["leader-completes-between-check-and-park", "follower-parks-before-leader"],
)
def test_each_interleaving_runs_the_follower_exactly_once(
    store: CausalStore, order: list[str]
) -> None:
    runs = _run_pair(store, "f1", "L", order)
    assert runs == {"f1": 1}
    assert store.count_followers("default", "L") == 0  # nothing left for the sweep


@pytest.mark.timeout(180)
def test_racing_pairs_released_through_a_barrier(store: CausalStore) -> None:
    # Given 60 leader/follower pairs whose two sides start together on 8 threads
    pairs = [(f"f{i}", f"L{i}") for i in range(60)]
    steps = [("follow", f, leader) for f, leader in pairs] + [
        ("lead", f, leader) for f, leader in pairs
    ]
    random.Random(7).shuffle(steps)
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(my_steps: list[tuple[str, str, str]]) -> None:
        barrier.wait()
        for kind, fid, leader in my_steps:
            if kind == "lead":
                if store.record_done("default", leader):
                    for claimed in store.claim_followers("default", leader, 100):
                        store.finish([claimed.row_id])
                        with lock:
                            runs[claimed.follower_id] += 1
            elif leader in store.lookup("default", [leader], TTL).done or (
                store.park(follower(fid, leader), TTL) is ParkOutcome.LEADER_DONE
            ):
                with lock:
                    runs[fid] += 1

    threads = [threading.Thread(target=worker, args=(steps[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Then every follower ran exactly once and none waits for the sweep
    assert runs == {f: 1 for f, _ in pairs}
    assert sum(s.waiting + s.releasing for s in store.stats(lookback=900)) == 0
