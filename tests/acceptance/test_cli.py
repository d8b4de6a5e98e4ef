"""``celery -A app causal ...`` run as subprocesses against real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.exceptions import TaskRevokedError
from sqlalchemy import create_engine, inspect

from celery_causal.sql import open_store
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
    assert "showing" not in listing.stderr  # nothing was cut
    cut = causal_cli(s.env, "list", "--json", "--limit", "2")
    rows = json.loads(cut.stdout)
    assert "showing 2 of 3" in cut.stderr and "--limit" in cut.stderr
    assert "showing 2 of 3" in causal_cli(s.env, "list", "--limit", "2").stderr
    assert len(rows) == 2 and {r["follower_id"] for r in rows} <= set(ids)
    assert rows[0]["age_seconds"] >= rows[1]["age_seconds"]  # oldest first
    assert {r["leader_id"] for r in rows} == {leader}
    short = json.loads(causal_cli(s.env, "status", "-j").stdout)  # -j as in celery inspect
    assert short["scopes"][0]["waiting"] == 3
    both = causal_cli(s.env, "status", "--json", "--prometheus")
    assert both.returncode == 2 and "--json" in both.stderr and "--prometheus" in both.stderr
    metrics = causal_cli(s.env, "status", "--prometheus").stdout
    assert "# TYPE celery_causal_waiting_followers gauge" in metrics
    assert 'celery_causal_waiting_followers{scope="acc"} 3' in metrics


def test_show_tells_one_followers_story(parked: tuple[Spawned, str, list[str]]) -> None:
    s, leader, ids = parked
    # Given a follower parked behind one of the parked followers
    behind = f"{ids[0]}-behind"
    s.handle.step.apply_async(("cli", "behind"), task_id=behind, follows=ids[0])
    wait_for(lambda: s.store.count_followers("acc", ids[0]) == 1, 60, "parked behind")
    shown = causal_cli(s.env, "show", ids[1])
    assert shown.returncode == 0, shown.stderr
    assert "task:" in shown.stdout and "acc.step" in shown.stdout
    assert f"('cli', '{ids[1]}')" in shown.stdout  # as the producer's argsrepr shows them
    assert leader in shown.stdout and "not-seen" in shown.stdout
    story = json.loads(causal_cli(s.env, "show", ids[1], "--json").stdout)
    assert (story["scope"], story["follower_id"], story["task"]) == ("acc", ids[1], "acc.step")
    assert (story["leader_id"], story["leader_state"], story["state"]) == (
        leader,
        "not-seen",
        "waiting",
    )
    assert story["deadline"] == pytest.approx(story["parked_at"] + 3)  # CAUSAL_LOOKBACK
    assert story["claimed_at"] is None and story["parked_age_seconds"] >= 0
    assert "sweep" in story["release"]
    assert json.loads(causal_cli(s.env, "show", behind, "-j").stdout)["leader_state"] == "parked"
    missing = causal_cli(s.env, "show", "no-such-follower")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: no parked follower 'no-such-follower'"


def test_release_and_forget_one_follower(parked: tuple[Spawned, str, list[str]]) -> None:
    s, leader, ids = parked
    log = s.log("cli")
    released = causal_cli(s.env, "release", ids[0])
    assert released.returncode == 0, released.stderr
    assert log.wait_len(1) == [ids[0]]
    refused = causal_cli(s.env, "forget", ids[1], input="n\n")
    assert refused.returncode != 0 and s.store.count_followers("acc", leader) == 2
    forgot = causal_cli(s.env, "forget", ids[1], "-y")
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


@pytest.mark.core
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


#: Every command but ``migrate``: none of them may create the schema.
NOT_MIGRATE = [
    ("status",),
    ("list",),
    ("show", "f1"),
    ("sweep",),
    ("release", "f1"),
    ("forget", "f1", "--yes"),
]


def assert_schema_missing(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 78, result.stderr
    assert "no celery-causal tables" in result.stderr and "causal migrate" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no parked followers" not in result.stdout


def test_commands_on_a_database_without_the_schema_say_so_and_leave_it_as_it_was(
    acceptance_env: dict[str, str],
) -> None:
    # Given a database that exists but holds no celery-causal tables (a mistyped name)
    with fresh_database(f"_typo_{uuid.uuid4().hex[:6]}") as url:
        env = dict(acceptance_env, CAUSAL_STORE_URL=url)
        for args in NOT_MIGRATE:
            assert_schema_missing(causal_cli(env, *args))
        engine = create_engine(url)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
        assert causal_cli(env, "migrate").returncode == 0
        assert causal_cli(env, "status").returncode == 0


def test_commands_given_a_sqlite_file_that_does_not_exist_do_not_create_it(
    acceptance_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "typo.sqlite3"
    env = dict(acceptance_env, CAUSAL_STORE_URL=f"sqlite:///{path}")
    for args in NOT_MIGRATE:
        assert_schema_missing(causal_cli(env, *args))
    assert list(tmp_path.iterdir()) == []
    created = causal_cli(env, "migrate")
    assert created.returncode == 0 and "created table causal_followers" in created.stdout


@pytest.mark.parametrize(
    ("url", "code", "expected"),
    [
        ("postgresql+psycopg://causal:hunter2@127.0.0.1:1/nowhere", 69, "failed"),
        ("mysql://causal:hunter2@127.0.0.1/x", 78, "unsupported scheme"),
        ("postgresql+psycopg2://causal:hunter2@127.0.0.1/x", 78, "postgresql+psycopg://"),
        ("postgresql+asyncpg://causal:hunter2@127.0.0.1/x", 78, "causal_store_url"),
    ],
    ids=["unreachable", "wrong-scheme", "psycopg2", "asyncpg"],
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


def test_a_worker_given_another_postgresql_driver_stops_on_the_settings_error(
    acceptance_env: dict[str, str],
) -> None:
    env = dict(acceptance_env, CAUSAL_STORE_URL="postgresql+psycopg2://causal:hunter2@db/x")
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.acceptance.causal_app", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 78  # a configuration error, in one line
    assert "Traceback" not in worker.stderr and "causal_store_url" in worker.stderr
    assert "postgresql+psycopg://" in worker.stderr
    assert "ModuleNotFoundError" not in worker.stderr and "hunter2" not in worker.stderr


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for family in text_string_to_metric_families(text)
        for m in family.samples
    }


def test_textfile_is_replaced_whole_and_a_failed_run_says_so(
    acceptance_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "causal.prom"
    with fresh_database(f"_prom_{uuid.uuid4().hex[:6]}") as url:
        env = dict(acceptance_env, CAUSAL_STORE_URL=url)
        assert causal_cli(env, "migrate").returncode == 0
        store = open_store(url)
        try:
            store.park(follower("f1", "gone", scope="metrics"), 900)
        finally:
            store.close()
        before = time.time()
        written = causal_cli(env, "status", "--textfile", str(path))
        assert written.returncode == 0, written.stderr
        good = samples(path.read_text())
        assert good[("celery_causal_waiting_followers", (("scope", "metrics"),))] == 1
        assert good[("celery_causal_up", ())] == 1
        last_success = good[("celery_causal_last_success_timestamp_seconds", ())]
        assert before - 1 <= last_success <= time.time() + 1
        # The printed gauges are the same series as the file's
        printed = samples(causal_cli(env, "status", "--prometheus").stdout)
        assert set(printed) == set(good)
        assert printed[("celery_causal_waiting_followers", (("scope", "metrics"),))] == 1
    # When a run cannot read the store (its database is gone)
    failed = causal_cli(env, "status", "--textfile", str(path))
    assert failed.returncode == 69 and len(failed.stderr.strip().splitlines()) == 1
    # Then the file says so, keeps the last success, and no temporary file is left
    after = samples(path.read_text())
    assert after[("celery_causal_up", ())] == 0
    assert after[("celery_causal_last_success_timestamp_seconds", ())] == last_success
    assert not any(name.startswith("celery_causal_waiting") for name, _ in after)
    assert [p.name for p in tmp_path.iterdir()] == ["causal.prom"]
    both = causal_cli(env, "status", "--textfile", str(path), "-j")
    assert both.returncode == 2 and "choose one" in both.stderr


def test_textfile_without_prometheus_client_names_the_extra(
    acceptance_env: dict[str, str], tmp_path: Path
) -> None:
    # Given an environment where prometheus_client cannot be imported
    hidden = tmp_path / "hide"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text("raise ImportError('hidden')\n")
    env = dict(
        acceptance_env,
        PYTHONPATH=f"{hidden}{os.pathsep}{acceptance_env['PYTHONPATH']}",
        CAUSAL_STORE_URL=f"sqlite:///{tmp_path / 'causal.sqlite3'}",
    )
    result = causal_cli(env, "status", "--textfile", str(tmp_path / "causal.prom"))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        "Error: --textfile needs prometheus_client: pip install 'celery-causal[metrics]'"
    )
    assert not (tmp_path / "causal.prom").exists()
    assert causal_cli(env, "migrate").returncode == 0
    assert causal_cli(env, "status", "--prometheus").returncode == 0  # printing needs no extra


def test_sweep_of_many_shows_progress_and_status_counts_dead_rows(
    spawn: Callable[..., Spawned],
) -> None:

    s = spawn(CAUSAL_BATCH_SIZE="100")
    for i in range(250):
        s.store.park(follower(f"many-{i}", "gone", scope="bulk"), 900)
    s.store.park(follower("broken", "gone", scope="bulk"), 900)
    with s.store.engine.connect() as conn:
        from sqlalchemy import update

        from celery_causal.sql.schema import followers

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


def test_list_by_key_shows_the_keys_newest_task_and_its_parked_tasks(
    spawn: Callable[..., Spawned],
) -> None:
    # Given a key whose first task is held back by a countdown, and two sent behind it
    s = spawn()
    key = f"customer-{uuid.uuid4().hex[:6]}"
    first = s.handle.keyed.apply_async(("cli-keys", key, "p0-0"), countdown=600)
    second = s.handle.keyed.apply_async(("cli-keys", key, "p0-1"))
    third = s.handle.keyed.apply_async(("cli-keys", key, "p0-2"))
    wait_for(lambda: s.store.count_parked("acc", None, key=key) == 2, 60, "two parked")
    # When an operator lists the key
    listing = causal_cli(s.env, "list", "--key", key)
    assert listing.returncode == 0, listing.stderr
    # Then it names the newest task and what it follows, and lists the parked tasks
    head, *rows = listing.stdout.strip().splitlines()
    assert head.startswith(f"key '{key}' (scope 'acc'): newest task {third.id} (follows ")
    assert second.id in head
    assert sorted(row.split()[1] for row in rows[1:]) == sorted([second.id, third.id])
    listed = json.loads(causal_cli(s.env, "list", "--key", key, "--json").stdout)
    assert {(r["follower_id"], r["leader_id"], r["ordering_key"]) for r in listed} == {
        (second.id, first.id, key),
        (third.id, second.id, key),
    }
    shown = causal_cli(s.env, "show", third.id)
    assert f"ordering key: {key}" in shown.stdout
    assert second.info["ordering_key"] == key and second.info["follows"] == first.id
    # and a key nothing was sent under is free
    free = causal_cli(s.env, "list", "--key", "no-such-key")
    assert free.stdout.startswith("key 'no-such-key' is free")
