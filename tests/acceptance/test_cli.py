"""``celery -A app causal ...`` run as subprocesses against real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest
from celery.exceptions import TaskRevokedError

from tests.acceptance.conftest import ROOT, Spawned
from tests.conftest import fresh_database
from tests.helpers import age, follower, wait_for


def causal_cli(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.acceptance.causal_app", "causal", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=input,
    )


@pytest.fixture
def parked(spawn: Callable[..., Spawned]) -> tuple[Spawned, str, list[str]]:
    """A worker with three followers parked behind a leader that has not run."""
    s = spawn(CAUSAL_LOOKBACK="3", CAUSAL_SEEN_TTL="60")
    leader, run = f"cli-leader-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    ids = [f"{run}-f{i}" for i in range(3)]
    for fid in ids:
        s.handle.step.apply_async(("cli", fid), task_id=fid, follows=leader)
    wait_for(lambda: s.store.count_followers("acc", leader) == 3, 60, "parked")
    return s, leader, ids


def test_status_list_and_prometheus(parked: tuple[Spawned, str, list[str]]) -> None:
    s, leader, ids = parked
    status = causal_cli(s.env, "status")
    assert status.returncode == 0, status.stderr
    assert "acc" in status.stdout and "waiting" in status.stdout
    data = json.loads(causal_cli(s.env, "status", "--json").stdout)
    (scope,) = data["scopes"]
    assert (scope["scope"], scope["waiting"], scope["releasing"]) == ("acc", 3, 0)
    assert scope["oldest_age_seconds"] >= 0
    assert data["store"] == s.env["CAUSAL_STORE_URL"]  # no password to mask here
    listing = causal_cli(s.env, "list", "--leader", leader)
    assert listing.returncode == 0
    assert all(fid in listing.stdout for fid in ids) and "acc.step" in listing.stdout
    rows = json.loads(causal_cli(s.env, "list", "--json", "--limit", "2").stdout)
    assert len(rows) == 2 and {r["follower_id"] for r in rows} <= set(ids)
    assert rows[0]["age_seconds"] >= rows[1]["age_seconds"]  # oldest first
    assert {r["leader_id"] for r in rows} == {leader}
    metrics = causal_cli(s.env, "status", "--prometheus").stdout
    assert "# TYPE celery_causal_waiting_followers gauge" in metrics
    assert 'celery_causal_waiting_followers{scope="acc"} 3' in metrics


def test_release_and_forget_one_follower(parked: tuple[Spawned, str, list[str]]) -> None:
    s, leader, ids = parked
    log = s.log("cli")
    released = causal_cli(s.env, "release", ids[0])
    assert released.returncode == 0, released.stderr
    assert log.wait_len(1) == [ids[0]]
    refused = causal_cli(s.env, "forget", ids[1], input="n\n")
    assert refused.returncode != 0 and s.store.count_followers("acc", leader) == 2
    forgot = causal_cli(s.env, "forget", ids[1], "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert s.store.count_followers("acc", leader) == 1
    missing = causal_cli(s.env, "release", "no-such-follower")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: no parked follower 'no-such-follower'"
    # The leader releases what is left: the forgotten follower never runs
    s.handle.step.apply_async(("cli", "leader"), task_id=leader)
    assert log.wait_len(3) == [ids[0], "leader", ids[2]]


def test_a_forgotten_follower_ends_revoked_and_its_producer_stops_waiting(
    parked: tuple[Spawned, str, list[str]],
) -> None:
    # Given a parked follower whose producer waits on its result
    s, _, ids = parked
    result = s.handle.step.AsyncResult(ids[0])
    assert result.state == "DEFERRED"
    # When an operator forgets it
    forgot = causal_cli(s.env, "forget", ids[0], "--yes")
    assert forgot.returncode == 0, forgot.stderr
    # Then the producer's get() raises at once, as for a task Celery revoked
    started = time.monotonic()
    with pytest.raises(TaskRevokedError, match="forgotten by an operator"):
        result.get(timeout=30)
    assert time.monotonic() - started < 10
    assert result.state == "REVOKED"
    assert s.handle.step.AsyncResult(ids[1]).state == "DEFERRED"  # the others still wait


def test_sweep_releases_lost_followers(parked: tuple[Spawned, str, list[str]]) -> None:
    s, _, ids = parked
    wait_for(lambda: sum(x.overdue for x in s.store.stats()) == 3, 60, "lookback passed")
    swept = causal_cli(s.env, "sweep")
    assert swept.returncode == 0, swept.stderr
    assert "released 3 lost follower(s)" in swept.stdout
    assert sorted(s.log("cli").wait_len(3)) == sorted(ids)


def test_migrate_creates_then_reports_up_to_date(acceptance_env: dict[str, str]) -> None:
    with fresh_database(f"_migrate_{uuid.uuid4().hex[:6]}") as url:
        env = dict(acceptance_env, CAUSAL_STORE_URL=url)
        first = causal_cli(env, "migrate")
        assert first.returncode == 0, first.stderr
        assert "created table causal_followers" in first.stdout
        assert "created index causal_followers_leader_idx" in first.stdout
        again = causal_cli(env, "migrate")
        assert "schema is up to date" in again.stdout


@pytest.mark.parametrize(
    ("url", "code", "expected"),
    [
        ("postgresql+psycopg://causal:hunter2@127.0.0.1:1/nowhere", 69, "failed"),
        ("mysql://causal:hunter2@127.0.0.1/x", 78, "unsupported scheme"),
    ],
    ids=["unreachable", "wrong-scheme"],
)
def test_bad_store_url_is_a_one_line_error_with_the_password_masked(
    acceptance_env: dict[str, str], url: str, code: int, expected: str
) -> None:
    result = causal_cli(dict(acceptance_env, CAUSAL_STORE_URL=url), "status")
    assert result.returncode == code
    assert expected in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sweep_of_many_shows_progress_and_status_counts_dead_rows(
    spawn: Callable[..., Spawned],
) -> None:

    s = spawn(CAUSAL_BATCH_SIZE="100")
    for i in range(250):
        s.store.park(follower(f"many-{i}", "gone", scope="bulk"), 900)
    s.store.park(follower("broken", "gone", scope="bulk"), 900)
    with s.store.engine.connect() as conn:
        from sqlalchemy import update

        from celery_causal.sql_schema import followers

        conn.execute(
            update(followers)
            .where(followers.c.follower_id == "broken")
            .values(payload=b"\xff not json")
        )
    age(s.store, 10_000)
    swept = causal_cli(s.env, "sweep")
    assert swept.returncode == 0, swept.stderr
    assert "releasing lost followers" in swept.stdout  # the progress bar's label
    assert "released 250 lost follower(s)" in swept.stdout
    assert "refused 1 unreadable" in swept.stdout
    (scope,) = json.loads(causal_cli(s.env, "status", "--json").stdout)["scopes"]
    assert (scope["scope"], scope["waiting"], scope["dead"]) == ("bulk", 0, 1)
    assert (
        'celery_causal_dead_followers{scope="bulk"} 1'
        in causal_cli(s.env, "status", "--prometheus").stdout
    )
