"""A real Flower process shows parked tasks as DEFERRED, then SUCCESS once released."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_causal.task import runtime_for
from tests.acceptance.conftest import CeleryProcess, Spawned
from tests.helpers import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _deferred_events(port: int) -> float:
    """``flower_events_total`` of type task-deferred, summed over workers and tasks."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("flower_events_total{") and 'type="task-deferred"' in line
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.core
@pytest.mark.timeout(300)
def test_flower_lists_a_parked_task_as_deferred_then_success(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    s = spawn("-E", CAUSAL_ON_LEADER_FAILURE="fail")
    port = _free_port()
    flower = CeleryProcess(
        dict(s.env, FLOWER_UNAUTHENTICATED_API="true"),
        tmp_path / "flower.log",
        ["flower", f"--port={port}", "--address=127.0.0.1"],
    )
    flower.start()
    try:
        wait_for(lambda: _healthy(port), 60, "Flower's health check")
        wait_for(lambda: _get(port, "/api/workers?refresh=1"), 60, "Flower seeing the worker")
        leader, follower = f"fl-leader-{uuid.uuid4()}", f"fl-follower-{uuid.uuid4()}"
        s.handle.step.apply_async(("flower", "follower"), task_id=follower, follows=leader)

        deferred = wait_for(
            lambda: (_get(port, "/api/tasks?state=DEFERRED") or {}).get(follower),
            60,
            "the follower listed as DEFERRED",
        )
        assert deferred["state"] == "DEFERRED"
        assert deferred["name"] == "acc.step"
        info = _get(port, f"/api/task/info/{follower}")
        assert info["state"] == "DEFERRED"
        # Flower's own /metrics counts the parks (the README points monitoring at it)
        wait_for(lambda: _deferred_events(port) >= 1, 60, "task-deferred in Flower's /metrics")

        s.handle.step.apply_async(("flower", "leader"), task_id=leader)
        wait_for(
            lambda: (_get(port, f"/api/task/info/{follower}") or {}).get("state") == "SUCCESS",
            60,
            "the follower shown as SUCCESS",
        )

        # A leader that failed for good in another process (here: this one, as a leader's
        # worker elsewhere would) records its failure and releases its follower; the
        # worker ends the follower FAILURE with LeaderFailed through Celery's tracer, which
        # sends the task-failed event Flower shows, without running its body
        other = f"fl-other-{uuid.uuid4()}"
        s.handle.step.apply_async(("flower", "other"), task_id=other, follows="fl-gone")
        wait_for(lambda: s.store.count_followers("acc", "fl-gone") == 1, 60, "parked")
        runtime = runtime_for(s.handle.app)
        runtime.send_events = True
        assert runtime.leader_failed("acc", "fl-gone", 0) == 1
        failed = wait_for(
            lambda: (
                info
                if (info := _get(port, f"/api/task/info/{other}") or {}).get("state") == "FAILURE"
                else None
            ),
            60,
            "the failed follower shown as FAILURE",
        )
        assert "LeaderFailed" in failed["exception"] and "fl-gone" in failed["exception"]
        assert s.store.count_followers("acc", "fl-gone") == 0
        assert s.log("flower").entries() == ["leader", "follower"]
        # No phantom worker: every event came under the real worker's name
        workers = (_get(port, "/workers?json=1") or {}).get("data", [])
        assert [w["hostname"] for w in workers] == [s.worker.nodename]
    finally:
        flower.stop()
