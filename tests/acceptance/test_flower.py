"""A real Flower process shows parked tasks as DEFERRED, then SUCCESS once released."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_causal.forget import forget
from celery_causal.registry import runtime_for
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
        # What it waits for, and until when, on the task's page (its Result line) and for
        # programs in the result backend
        assert f"waits for leader {leader} (scope 'acc') since " in info["result"]
        assert "by the sweep from " in info["result"]
        meta = s.handle.app.AsyncResult(follower).info
        assert (meta["follows"], meta["scope"]) == (leader, "acc")
        parked_at = datetime.fromisoformat(meta["parked_at"])
        releases_at = datetime.fromisoformat(meta["sweep_releases_at"])
        assert releases_at - parked_at == timedelta(seconds=900)  # causal_lookback
        # Flower's own /metrics counts the parks (the README points monitoring at it)
        wait_for(lambda: _deferred_events(port) >= 1, 60, "task-deferred in Flower's /metrics")

        s.handle.step.apply_async(("flower", "leader"), task_id=leader)
        wait_for(
            lambda: (_get(port, f"/api/task/info/{follower}") or {}).get("state") == "SUCCESS",
            60,
            "the follower shown as SUCCESS",
        )

        # A follower of several leaders: its page names those it still waits for
        fan_in, missing = f"fl-fan-in-{uuid.uuid4()}", f"fl-missing-{uuid.uuid4()}"
        s.handle.step.apply_async(("flower", "fan-in"), task_id=fan_in, follows=[leader, missing])
        shown = wait_for(
            lambda: (_get(port, f"/api/task/info/{fan_in}") or {}).get("result") or "",
            60,
            "the fan-in follower's Result line",
        )
        assert f"waits for leader {missing}" in shown
        assert f"1 of its 2 leaders not done: {missing}" in shown

        # A leader that failed for good in another process (here: this one, as a leader's
        # worker elsewhere would) records its failure and releases its follower; the
        # worker ends the follower FAILURE with LeaderFailed through Celery's tracer, which
        # sends the task-failed event Flower shows, without running its body
        other = f"fl-other-{uuid.uuid4()}"
        s.handle.step.apply_async(("flower", "other"), task_id=other, follows="fl-gone")
        wait_for(lambda: s.store.count_followers("acc", "fl-gone") == 1, 60, "parked")
        runtime = runtime_for(s.handle.app)
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

        # A parked task an operator forgets gets its task-revoked event (from the CLI's
        # process, under the name of the worker that parked it). Celery's event state,
        # which Flower shows, ranks a custom state such as DEFERRED above REVOKED, so the
        # state column stays DEFERRED; the task's revoked time is set.
        dropped = f"fl-dropped-{uuid.uuid4()}"
        s.handle.step.apply_async(("flower", "dropped"), task_id=dropped, follows="fl-never")
        wait_for(lambda: s.store.count_followers("acc", "fl-never") == 1, 60, "parked")
        assert forget(runtime, "acc", dropped) is not None
        wait_for(
            lambda: (_get(port, f"/api/task/info/{dropped}") or {}).get("revoked"),
            60,
            "the forgotten follower's revoked time in Flower",
        )
        # No phantom worker: every event came under the real worker's name
        workers = (_get(port, "/workers?json=1") or {}).get("data", [])
        assert [w["hostname"] for w in workers] == [s.worker.nodename]
    finally:
        flower.stop()


@pytest.mark.timeout(300)
def test_a_worker_whose_events_flower_switched_on_reports_its_parked_tasks(
    spawn: Callable[..., Spawned], tmp_path: Path
) -> None:
    # Given a worker started without -E, and Flower, which switches task events on in the
    # workers it finds (the enable_events control command)
    s = spawn()
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
        pings: list[str] = []

        def flower_saw_a_ping() -> bool:
            pings.append(s.handle.ping.apply_async().id)  # events of a task sent after the
            seen = _get(port, "/api/tasks?taskname=acc.ping") or {}  # switch reach Flower
            return any(seen.get(p, {}).get("state") == "SUCCESS" for p in pings)

        wait_for(flower_saw_a_ping, 90, "task events switched on by Flower")
        # When a follower parks
        follower = f"fl-remote-{uuid.uuid4()}"
        s.handle.step.apply_async(("remote", "f"), task_id=follower, follows="fl-remote-gone")
        # Then Flower shows it DEFERRED, not STARTED (with a Terminate button)
        deferred = wait_for(
            lambda: (
                info
                if (info := _get(port, f"/api/task/info/{follower}") or {}).get("state")
                == "DEFERRED"
                else None
            ),
            60,
            "the follower shown as DEFERRED",
        )
        assert "fl-remote-gone" in deferred["result"]
    finally:
        flower.stop()
