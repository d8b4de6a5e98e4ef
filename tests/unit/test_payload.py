from __future__ import annotations

import datetime
import decimal
import pickle
import uuid
from dataclasses import replace

import pytest
from celery import Celery
from celery.result import AsyncResult, GroupResult
from kombu.serialization import dumps

from celery_causal.errors import InvalidLeaderError, PayloadError
from celery_causal.payload import Message, build_message, follows_header, leader_id, pack, unpack
from celery_causal.store import Follower

JSON = {"application/json"}
ACCEPT_ALL = {
    "application/json",
    "application/x-python-serialize",
    "application/x-yaml",
}
APP = Celery("payload-tests", set_as_current=False)


def _message(args: object = (), kwargs: object = None, **options: object) -> Message:
    return build_message(
        APP, "t", args, kwargs or {}, {"task_id": "f", "queue": "q", **options}, "json"
    )


def _pack(message: Message | None = None, **kw: object) -> Follower:
    base: dict[str, object] = {
        "scope": "s",
        "task_name": "t",
        "task_id": "f",
        "leader": "L",
        "occurred_at": 1.0,
        "message": message or _message(),
        "max_bytes": 1024 * 1024,
    }
    base.update(kw)
    return pack(**base)  # type: ignore[arg-type]


def test_json_round_trip_keeps_celery_types() -> None:
    values = [
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("1.10"),
        b"\x00\xffbytes",
        datetime.date(2026, 5, 1),
    ]
    follower = _pack(_message(args=values, kwargs={"k": values[2]}))
    message = unpack(follower, JSON)
    args, kwargs, _embed = message.decoded_body(JSON)
    assert args == values
    assert kwargs == {"k": decimal.Decimal("1.10")}
    assert message.headers["id"] == "f"
    assert message.headers["task"] == "t"
    assert (message.exchange, message.routing_key, message.queue) == ("", "q", "q")
    assert message.content_type == "application/json"


def test_the_stored_message_is_the_one_send_task_builds() -> None:
    # Given the options of a delivered task with callbacks, limits, a priority and a reply
    options = {
        "root_id": "r",
        "parent_id": "p",
        "link": [{"task": "cb", "args": [], "kwargs": {}, "options": {}}],
        "time_limit": 30,
        "soft_time_limit": 20,
        "priority": 7,
        "reply_to": "reply-queue",
        "headers": {"custom": "kept"},
        "argsrepr": "(<secret>,)",
    }
    message = unpack(_pack(_message([1], {}, **options)), JSON)
    # Then the message carries them as Celery's own publish would
    assert message.headers["root_id"] == "r"
    assert message.headers["parent_id"] == "p"
    assert message.headers["timelimit"] == [30, 20]
    assert message.headers["custom"] == "kept"
    assert message.headers["argsrepr"] == "(<secret>,)"
    assert message.decoded_body(JSON)[2]["callbacks"] == options["link"]
    assert message.properties["priority"] == 7
    assert message.properties["reply_to"] == "reply-queue"
    assert message.delivery_mode == APP.conf.task_default_delivery_mode


def test_a_delivery_through_a_named_exchange_keeps_its_routing() -> None:
    message = build_message(
        APP, "t", [], {}, {"task_id": "f", "exchange": "ex", "routing_key": "rk"}, "json"
    )
    assert (message.exchange, message.routing_key, message.queue) == ("ex", "rk", None)


@pytest.mark.parametrize("serializer", ["json", "pickle", "yaml"])
def test_every_serializer_stores_the_body_as_the_bytes_it_encoded(serializer: str) -> None:
    args, kwargs = [1, "two"], {"k": 3}
    message = build_message(APP, "t", args, kwargs, {"task_id": "f", "queue": "q"}, serializer)
    row = _pack(message)
    # The row's content type is the body's, and the payload ends with the body's bytes
    content_type, content_encoding, data = dumps(
        (args, kwargs, message.decoded_body(ACCEPT_ALL)[2]), serializer=serializer
    )
    assert (row.content_type, row.content_encoding) == (content_type, content_encoding)
    encoded = data.encode(content_encoding) if isinstance(data, str) else data
    assert row.payload.endswith(encoded)
    stored = unpack(row, ACCEPT_ALL)
    # Released unread: the same bytes, content type and encoding go to the broker
    assert (stored.body, stored.content_type, stored.content_encoding) == (
        encoded,
        content_type,
        content_encoding,
    )
    assert list(stored.decoded_body(ACCEPT_ALL)[:2]) == [args, kwargs]
    assert stored.headers == message.headers


def test_unserializable_argument_is_a_clear_error() -> None:
    with pytest.raises(PayloadError, match="does not serialize with 'json'"):
        _pack(_message(args=[object()]))


def test_payload_over_the_limit_is_refused() -> None:
    with pytest.raises(PayloadError, match="causal_max_payload_bytes"):
        _pack(_message(args=["x" * 5000]), max_bytes=2048)


def test_pickle_rows_are_refused_unless_accepted() -> None:
    message = build_message(APP, "t", [], {}, {"task_id": "f", "queue": "q"}, "pickle")
    planted = _pack(message)
    assert planted.content_type == "application/x-python-serialize"
    assert list(pickle.loads(planted.payload.partition(b"\n")[2])[0]) == []  # pickled body
    with pytest.raises(PayloadError, match="not accepted"):
        unpack(planted, JSON)
    accepted = unpack(planted, JSON | {"application/x-python-serialize"})
    assert list(accepted.decoded_body({"application/x-python-serialize"})[0]) == []


def test_corrupt_rows_are_reported() -> None:
    broken = replace(_pack(), payload=b"{not json")
    with pytest.raises(PayloadError, match="corrupt"):
        unpack(broken, JSON)
    missing = replace(_pack(), payload=b'{"message": {"headers": {}}}')
    with pytest.raises(PayloadError, match="corrupt"):
        unpack(missing, JSON)


def test_leader_id_accepts_ids_and_async_results() -> None:
    assert leader_id("abc") == "abc"
    assert leader_id(AsyncResult("xyz")) == "xyz"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "not int"),
        ({"id": "x"}, "not dict"),
        ([], "empty list"),
        (["a", 7], "not int"),
        (["a", ""], "non-empty"),
        ([f"l{i}" for i in range(4)], r"names 4 leaders; the limit is causal_max_leaders \(3\)"),
        ("", "non-empty"),
        ("  ", "non-empty"),
        ("x" * 256, "the limit is 255"),
        (object(), "not object"),
    ],
)
def test_bad_leaders_are_clear_errors(value: object, message: str) -> None:
    with pytest.raises(InvalidLeaderError, match=message):
        follows_header(value, max_leaders=3)
    assert issubclass(InvalidLeaderError, ValueError)


def test_several_leaders_are_listed_each_once_and_a_list_of_one_is_one_leader() -> None:
    class Result:
        id = "c"

    assert follows_header(["a", "b", "a", Result()]) == ["a", "b", "c"]
    assert follows_header(["a", "a"]) == "a"
    assert follows_header(Result()) == "c"


def test_a_group_result_stands_for_each_of_its_tasks() -> None:
    app = Celery("group", set_as_current=False)
    group = GroupResult("group-id", [AsyncResult("a", app=app), AsyncResult("b", app=app)], app=app)
    assert follows_header(group) == ["a", "b"]
    assert follows_header([group, "c"]) == ["a", "b", "c"]
