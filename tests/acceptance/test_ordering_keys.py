"""Ordering keys through real prefork workers, Redis and PostgreSQL: per key, one task at a
time, in the order the sends were recorded, whatever the producers and the delivery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from celery_causal import LeaderFailed
from tests.acceptance.conftest import ROOT, Spawned, WorkerProcess
from tests.helpers import age, wait_for

PRODUCERS, KEYS = 3, 50
SENDS = int(os.environ.get("CAUSAL_TEST_KEY_SENDS", "1000"))


def _entries(raw: list[str]) -> list[list[Any]]:
    return [json.loads(entry) for entry in raw]


def _check_key(runs: list[list[Any]]) -> None:
    """One key's log entries, in the order they were written: bodies never overlap, each
    task runs after the task its send was recorded behind, each producer's sends run in
    its send order."""
    labels_of: dict[str, str] = {}
    done: set[str] = set()
    last_index: dict[str, int] = {}
    for n in range(0, len(runs), 2):
        start, end = runs[n], runs[n + 1]
        # a start is followed by the end of the same body: no other body of the key between
        assert start[2] == "start" and end[2] == "end" and end[1] == start[1], (start, end)
        _, label, _, task_id, follows = start
        assert follows is None or follows in done, f"{label} ran before {follows} finished"
        labels_of[task_id] = label
        done.add(task_id)
        producer, i = label.split("-")
        assert int(i) > last_index.get(producer, -1), f"{label} ran out of its send order"
        last_index[producer] = int(i)


def test_keyed_sends_of_three_producers_run_one_at_a_time_in_recorded_order(
    spawn: Callable[..., Spawned],
) -> None:
    # Given two worker nodes on one store; a key's backlog is released in one cascade
    s = spawn(CAUSAL_MAX_DEPTH="10000")
    second = WorkerProcess(s.env, s.log_dir / "second.log", f"second{uuid.uuid4().hex[:6]}")
    second.start()
    try:
        log = s.log("keys")
        # When 3 producer processes send 1,000 keyed tasks each over 50 keys, with random
        # countdowns that shuffle delivery
        producers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.acceptance.key_producer",
                    str(p),
                    str(SENDS),
                    str(KEYS),
                    log.name,
                ],
                cwd=ROOT,
                env=s.env,
            )
            for p in range(PRODUCERS)
        ]
        for proc in producers:
            assert proc.wait(timeout=300) == 0
        entries = _entries(log.wait_len(2 * PRODUCERS * SENDS, timeout=600))
    finally:
        second.stop()
    # Then every task ran once
    starts = [e for e in entries if e[2] == "start"]
    assert len({e[1] for e in starts}) == len(starts) == PRODUCERS * SENDS
    # and per key, bodies never overlapped and ran in recorded order and send order
    per_key: dict[str, list[list[Any]]] = defaultdict(list)
    for entry in entries:
        per_key[entry[0]].append(entry)
    assert len(per_key) == KEYS
    for runs in per_key.values():
        _check_key(runs)
    # and nothing is left: no row parked, every key free again
    wait_for(lambda: s.store.count_parked(None, None) == 0, 60, "no parked row")
    assert all(s.store.key_tails(key) == [] for key in per_key)


def test_a_key_whose_newest_task_finished_long_ago_runs_its_next_task_at_once(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a keyed task that ran, and records that have all expired since (an hour on)
    s = spawn()
    log = s.log("free")
    key = f"customer-{uuid.uuid4().hex[:6]}"
    s.handle.keyed.apply_async((log.name, key, "p0-0")).get(timeout=60)
    assert s.store.key_tails(key) == []
    age(s.store, 3600)
    # When the next task is sent under the key
    result = s.handle.keyed.apply_async((log.name, key, "p0-1"))
    # Then it follows nothing and runs, without waiting for the sweep (none runs here)
    assert result.get(timeout=60) == "p0-1"
    entries = _entries(log.wait_len(4))
    assert entries[2][1] == "p0-1" and entries[2][4] is None


@pytest.mark.parametrize("policy", ["fail", "release", "wait"])
def test_a_failed_task_applies_the_failure_policy_to_the_rest_of_its_key(
    spawn: Callable[..., Spawned], policy: str
) -> None:
    # Given a key whose first task fails, with two more sent behind it
    s = spawn(CAUSAL_ON_LEADER_FAILURE=policy)
    log = s.log("failing")
    key = f"k-{uuid.uuid4().hex[:6]}"
    first = s.handle.keyed.apply_async((log.name, key, "p0-0"), {"fail": True}, countdown=2)
    second = s.handle.keyed.apply_async((log.name, key, "p0-1"))
    third = s.handle.keyed.apply_async((log.name, key, "p0-2"))
    with pytest.raises(ValueError):
        first.get(timeout=60)
    if policy == "fail":
        # Then what follows fails without running, and the key stays held by the failure
        for later in (second, third):
            with pytest.raises(LeaderFailed):
                later.get(timeout=60)
        assert [e[1] for e in _entries(log.entries())] == ["p0-0", "p0-0"]
        assert [t.task_id for t in s.store.key_tails(key)] == [third.id]
    elif policy == "release":
        # Then the key goes on, and is free once its newest task succeeded
        assert third.get(timeout=60) == "p0-2"
        assert [e[1] for e in _entries(log.entries())][::2] == ["p0-0", "p0-1", "p0-2"]
        assert s.store.key_tails(key) == []
    else:
        # Then the next task waits for the sweep, and the one behind it waits for it
        wait_for(lambda: s.store.count_parked("acc", None, key=key) == 2, 60, "two parked")
        rows = s.store.list_followers("acc", None, 10, key=key)
        assert {(r.follower_id, r.leader_id) for r in rows} == {
            (second.id, first.id),
            (third.id, second.id),
        }
        assert [e[1] for e in _entries(log.entries())] == ["p0-0", "p0-0"]
