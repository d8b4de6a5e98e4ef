"""Hostile and broken input: bound parameters everywhere, clear errors, nothing lost."""

from __future__ import annotations

import pickle
import uuid
from dataclasses import replace
from typing import Any

import pytest
from celery import Celery
from kombu.exceptions import EncodeError
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

import celery_causal
from celery_causal.errors import (
    InvalidIdError,
    InvalidLeaderError,
    StoreError,
    StoreUnavailable,
)
from celery_causal.registry import runtime_for
from celery_causal.sql import SQLStore, open_store
from celery_causal.sql.schema import followers
from celery_causal.store import CausalStore
from celery_causal.testing import MemoryStore
from tests.helpers import age, follower
from tests.integration.harness import Harness

TTL = 1800.0
LOOKBACK = 60.0
HOSTILE = [
    "x'); DROP TABLE causal_done; --",
    "quote \" and ' and ; and -- comment",
    "\\x00 not a real NUL, a backslash",
    "é𝄞漢字" * 63,  # 252 characters, multi-byte
    "%(b_scope)s %s ? :name $1",
    "line\nbreak\ttab",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_ids_and_scopes_round_trip_and_leave_tables_intact(
    store: CausalStore, value: str
) -> None:
    store.park(follower(value, value, scope=value), LOOKBACK)
    store.park(follower(value + "2", value, scope=value), LOOKBACK)
    assert [i.follower_id for i in store.list_followers(value, value, 10)] == [value, value + "2"]
    store.record_done(value, value)
    assert store.lookup(value, [value]).done == {value}
    claimed = store.claim_followers(value, value, 1)
    assert [(f.scope, f.follower_id, f.leader_id) for f in claimed] == [(value, value, value)]
    store.finish([claimed[0]])
    age(store, 2000)
    (lost,) = store.claim_lost(release_timeout=900, limit=10)
    assert lost.follower_id == value + "2"
    store.finish([lost])
    assert store.stats() == []
    assert store.expire_done(TTL, 10) == 1  # the done table is still there, and intact


def _app(store: CausalStore, **conf: Any) -> Celery:
    app = Celery(f"hostile-{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")
    app.conf.update(**conf)
    celery_causal.install(app, store=store, beat=False)
    return app


@pytest.mark.parametrize(
    ("follows", "error", "message"),
    [
        (7, InvalidLeaderError, "not int"),
        ({"id": "x"}, InvalidLeaderError, "not dict"),
        (object(), InvalidLeaderError, "not object"),
        ([f"l{i}" for i in range(101)], InvalidLeaderError, r"101 leaders; the limit is"),
        ([], InvalidLeaderError, "empty list"),
        (["a", None], InvalidLeaderError, "not NoneType"),
        ("", InvalidLeaderError, "non-empty"),
        ("x" * 300, InvalidLeaderError, "300 characters long"),
        ("nul\x00byte", InvalidLeaderError, "NUL"),
    ],
)
def test_bad_follows_is_refused_at_send_time(follows: Any, error: type, message: str) -> None:
    app = _app(MemoryStore())

    @celery_causal.causal_task(app, shared=False)
    def t() -> None: ...

    with pytest.raises(error, match=message):
        t.apply_async(follows=follows)


def test_bad_task_id_and_scope_are_refused_at_send_time() -> None:
    app = _app(MemoryStore())

    @celery_causal.causal_task(app, shared=False)
    def t() -> None: ...

    @celery_causal.causal_task(app, scope="x" * 256, shared=False)
    def wide() -> None: ...

    with pytest.raises(InvalidIdError, match="task_id is 256 characters"):
        t.apply_async(task_id="y" * 256)
    with pytest.raises(InvalidIdError, match=r"scope of .* the limit is 255"):
        wide.apply_async()


def test_arguments_the_serializer_cannot_carry_are_refused_at_send_time() -> None:
    app = _app(MemoryStore())

    @celery_causal.causal_task(app, shared=False)
    def t(x: object) -> None: ...

    with pytest.raises(EncodeError):
        t.apply_async((object(),), follows="leader")


def test_planted_pickle_and_corrupt_rows_are_moved_aside_and_the_rest_released(
    pg_store: SQLStore,
) -> None:
    # Given three followers of one leader; one row replaced by a pickle, one corrupted
    app = _app(pg_store)
    for name in ("pickled", "corrupt", "fine"):
        pg_store.park(follower(name, "L"), LOOKBACK)
    pickled = pickle.dumps({"args": [], "kwargs": {}, "options": {}})
    with pg_store.engine.connect() as conn:
        conn.execute(
            update(followers)
            .where(followers.c.follower_id == "pickled")
            .values(
                payload=pickled,
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )
        )
        conn.execute(
            update(followers)
            .where(followers.c.follower_id == "corrupt")
            .values(payload=b"\xff{tampered")
        )
    # When the leader completes
    released = runtime_for(app).complete("default", "L", 0)
    # Then the good follower is released, the two bad ones are moved aside, none run
    assert released == 1
    (stats,) = pg_store.stats()
    assert (stats.dead, stats.waiting, stats.releasing) == (2, 0, 0)
    with pg_store.engine.connect() as conn:
        reasons = dict(
            conn.execute(text("SELECT follower_id, reason FROM causal_dead_followers")).all()
        )
    assert "not accepted" in reasons["pickled"] and "corrupt" in reasons["corrupt"]


def test_statements_the_database_refuses_raise_store_error_not_unavailable(
    pg_store: SQLStore,
) -> None:
    with pytest.raises(StoreError) as info:
        pg_store.park(replace(follower("f", "L"), follower_id="a\x00b"), LOOKBACK)
    assert type(info.value) is StoreError


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.lookup("default", ["a"]),
        lambda s: s.park(follower("f", "L"), LOOKBACK),
        lambda s: s.record_done("default", "a"),
        lambda s: s.claim_followers("default", "L", 10),
    ],
    ids=["lookup", "park", "record_done", "claim"],
)
def test_unreachable_database_raises_store_unavailable_with_the_password_masked(
    operation: Any,
) -> None:
    store = open_store("postgresql+psycopg://causal:hunter2@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(StoreUnavailable) as info:
            operation(store)
        assert "hunter2" not in str(info.value) and "***" in str(info.value)
    finally:
        store.close()


def test_least_privilege_role_from_the_readme_runs_the_workers_operations(
    pg_url: str, pg_store: SQLStore
) -> None:
    role = f"causal_worker_{uuid.uuid4().hex[:6]}"
    grants = [
        f'CREATE ROLE "{role}" LOGIN',
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON causal_followers, causal_done, "
        f'causal_dead_followers, causal_keys, causal_key_sends, causal_scope_counts TO "{role}"',
        f'GRANT USAGE ON SEQUENCE causal_followers_id_seq TO "{role}"',
    ]
    with pg_store.engine.connect() as conn:
        for statement in grants:
            conn.execute(text(statement))
    worker_url = make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    store = open_store(worker_url, create_schema=False)
    try:
        store.park(follower("f1", "L"), LOOKBACK)
        store.park(follower("f2", "M"), LOOKBACK)
        store.record_done("default", "L")
        assert store.lookup("default", ["L"]).done == {"L"}
        (claimed,) = store.claim_followers("default", "L", 10)
        store.finish([claimed])
        age(pg_store, 2000)
        (lost,) = store.claim_lost(900, 10)
        store.bury(lost, "test")
        assert store.expire_done(TTL, 10) == 2  # L's done record and the mark f2 left on M
        assert store.stats()[0].dead == 1
        assert store.forget("default", "nothing") is None
        assert store.record_key("default", "k", "t1") is None  # a producer's send
        assert store.free_key("default", "k", "t1")
    finally:
        store.close()
        with pg_store.engine.connect() as conn:
            conn.execute(text("DELETE FROM causal_dead_followers"))
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE "{role}"'))


#: Headers another sender may set (send_task, a producer in another language), and what the
#: error must say about each.
BAD_HEADERS = [
    ("causal_follows", {"a": "b"}, "header causal_follows must be a task id or a list"),
    ("causal_follows", ["a", 7], "header causal_follows must be a task id or a list"),
    ("causal_follows", ["a", ""], "header causal_follows must be a non-empty string"),
    ("causal_leaders_seen", "", "header causal_leaders_seen must be a non-empty string"),
    ("causal_released_by", 7, "header causal_released_by must be a string, not int"),
    ("causal_first_parked_at", "soon", "header causal_first_parked_at must be a time"),
    ("causal_follows", "x" * 10_000, "header causal_follows is 10000 characters long"),
    ("causal_follows", "", "header causal_follows must be a non-empty string"),
    ("causal_published_at", "yesterday", "header causal_published_at must be a time"),
    ("causal_published_at", float("nan"), "header causal_published_at must be a time"),
    ("causal_released", {"by": "me"}, "header causal_released must be a string, not dict"),
    ("causal_depth", "deep", "header causal_depth must be an integer of at least 0, not str"),
    ("causal_depth", -1, "header causal_depth must be an integer of at least 0"),
]


def test_headers_from_another_sender_are_checked_on_arrival(causal_store: CausalStore) -> None:
    # Given messages sent without apply_async whose causal header (or task id) does not
    # fit, then an ordinary one
    h = Harness(causal_store)
    bad = [
        (
            h.app.send_task("tests.event", ("bad",), task_id=h.id(f"bad{i}"), headers={k: v}),
            complaint,
        )
        for i, (k, v, complaint) in enumerate(BAD_HEADERS)
    ]
    long_id = h.app.send_task("tests.event", ("bad",), task_id="t" * 300)
    bad.append((long_id, "task id is 300 characters long"))
    h.send("next")
    # When a worker takes them all, then each bad one fails with an error that names what
    # does not fit, without running its body, and the worker goes on with the next
    h.run_until(lambda: "next" in h.ran, "the next task")
    assert h.ran == ["next"]
    for result, complaint in bad:
        assert result.state == "FAILURE", complaint
        assert isinstance(result.result, celery_causal.InvalidMessageError), repr(result.result)
        assert complaint in str(result.result) and len(str(result.result)) < 400
