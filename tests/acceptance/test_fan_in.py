"""Fan-in through real prefork workers, Redis and PostgreSQL: a follower of several
leaders runs once, after all of them succeeded, whatever the order of arrival."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from celery_causal import LeaderFailed
from tests.acceptance.conftest import ROOT, Log, Spawned, WorkerProcess
from tests.helpers import wait_for

LEADERS = ["a", "b", "c"]
CLI = [sys.executable, "-m", "celery", "-A", "tests.acceptance.causal_app", "causal"]


def _arrive_in_order(s: Spawned, log: Log, n: int, order: tuple[str, ...]) -> list[str]:
    """Send the three leaders and their follower in ``order``, one at a time: the next goes
    once the last one ran, or parked (the follower, behind a leader that has not run).
    Return the order their bodies ran in."""
    ids = {label: f"{uuid.uuid4().hex[:8]}-{n}-{label}" for label in order}
    sent: list[str] = []

    def ran() -> list[str]:
        return [e.split(":")[1] for e in log.entries() if e.split(":")[0] == str(n)]

    def settled() -> bool:
        done = ran()
        if sent[-1] != "report" and sent[-1] not in done:
            return False
        if "report" not in sent or "report" in done:
            return True
        row = s.store.parked_follower("acc", ids["report"])
        not_run = {ids[leader] for leader in LEADERS if leader not in done}
        return row is not None and row.claimed_at is None and row.leader_id in not_run

    for label in order:
        follows = [ids[leader] for leader in LEADERS] if label == "report" else None
        s.handle.step.apply_async((log.name, f"{n}:{label}"), task_id=ids[label], follows=follows)
        sent.append(label)
        wait_for(settled, 60, f"{order}: {label} ran or parked")
    wait_for(lambda: len(ran()) == 4, 60, f"{order}: all ran")
    return ran()


def test_a_follower_of_three_leaders_runs_once_after_all_three_in_every_arrival_order(
    spawn: Callable[..., Spawned],
) -> None:
    s = spawn()
    log = s.log("fan-in-orders")
    for n, order in enumerate(itertools.permutations([*LEADERS, "report"])):
        ran = _arrive_in_order(s, log, n, order)
        # Every task ran once, the follower after all three leaders
        assert sorted(ran) == sorted([*LEADERS, "report"]), (order, ran)
        assert ran[-1] == "report", (order, ran)


def test_two_hundred_followers_of_ten_leaders_each_on_two_nodes(
    spawn: Callable[..., Spawned],
) -> None:
    # Given two worker nodes, and 200 followers each of 10 leaders drawn from 100, sent
    # before their leaders so that most park
    s = spawn()
    second = WorkerProcess(s.env, s.log_dir / "second.log", f"second{uuid.uuid4().hex[:6]}")
    second.start()
    try:
        log, run = s.log("fan-in"), uuid.uuid4().hex[:6]
        leaders = [f"{run}-L{i}" for i in range(100)]
        follows = {f"{run}-F{i}": random.Random(i).sample(leaders, 10) for i in range(200)}
        for fid, its_leaders in follows.items():
            s.handle.step.apply_async((log.name, fid), task_id=fid, follows=its_leaders)
        # When the leaders run, concurrently on the four processes of the two nodes, half
        # of them seconds after the others: a follower released by one of the first half
        # meets leaders that have not run yet
        for i, lid in enumerate(leaders):
            countdown = 0 if i < 50 else 3
            s.handle.step.apply_async((log.name, lid), task_id=lid, countdown=countdown)
        entries = log.wait_len(len(leaders) + len(follows), timeout=240)
    finally:
        second.stop()
    # Then each follower ran exactly once, after the last of its leaders
    counts = Counter(entries)
    assert set(counts) == set(leaders) | set(follows) and set(counts.values()) == {1}
    position = {task_id: i for i, task_id in enumerate(entries)}
    for fid, its_leaders in follows.items():
        assert position[fid] > max(position[lid] for lid in its_leaders), fid
    wait_for(lambda: s.store.count_parked(None, None) == 0, 60, "no parked row")


def test_a_follower_of_several_fails_naming_the_leader_that_failed(
    spawn: Callable[..., Spawned],
) -> None:
    # Given "fail", and a follower of a leader that succeeds and one that fails for good
    s = spawn(CAUSAL_ON_LEADER_FAILURE="fail")
    log, run = s.log("fan-in-fail"), uuid.uuid4().hex[:6]
    good, bad = f"{run}-good", f"{run}-bad"
    report = s.handle.step.apply_async((log.name, "report"), follows=[good, bad])
    wait_for(lambda: s.store.count_parked("acc", None) == 1, 60, "the follower parked")
    s.handle.step.apply_async((log.name, "good"), task_id=good).get(timeout=60)
    with pytest.raises(ValueError):
        s.handle.broken.apply_async((log.name, "bad"), task_id=bad).get(timeout=60)
    # Then it fails without running, with LeaderFailed naming the failed leader
    with pytest.raises(LeaderFailed, match=bad):
        report.get(timeout=60)
    assert sorted(log.entries()) == ["bad", "good"]


def test_show_and_the_deferred_state_name_every_leader_and_those_missing(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a follower of three leaders, one of which already succeeded
    s = spawn()
    log, run = s.log("fan-in-show"), uuid.uuid4().hex[:6]
    a, b, c = (f"{run}-{label}" for label in LEADERS)
    s.handle.step.apply_async((log.name, "a"), task_id=a).get(timeout=60)
    report = s.handle.step.apply_async((log.name, "report"), follows=[a, b, c])
    wait_for(lambda: s.store.count_parked("acc", None) == 1, 60, "the follower parked")
    # Then its DEFERRED state names its leaders and those it still waits for
    wait_for(lambda: report.state == "DEFERRED", 30, "DEFERRED")
    info = report.info
    assert (info["follows"], info["leaders"], info["missing"]) == (b, [a, b, c], [b, c])
    assert "2 of its 3 leaders not done" in info["result"]
    # and the operator's show lists each with its state
    shown = subprocess.run(
        [*CLI, "show", report.id, "--json"],
        cwd=ROOT,
        env=s.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["leaders"] == [
        {"id": a, "state": "done"},
        {"id": b, "state": "waited for"},
        {"id": c, "state": "missing"},
    ]
    # When the other two succeed, it runs once, last
    s.handle.step.apply_async((log.name, "c"), task_id=c).get(timeout=60)
    s.handle.step.apply_async((log.name, "b"), task_id=b).get(timeout=60)
    assert report.get(timeout=60) == "report"
    assert log.entries() == ["a", "c", "b", "report"]
