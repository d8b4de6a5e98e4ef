from __future__ import annotations

import datetime
import decimal
import pickle
import uuid
from dataclasses import replace

import pytest
from celery import Celery
from celery.result import AsyncResult
from kombu.serialization import dumps

from celery_causal.errors import InvalidLeaderError, PayloadError
from celery_causal.payload import Message, build_message, leader_id, pack, unpack
from celery_causal.store import Follower

JSON = {"application/json"}
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
    message = unpack(APP, follower, JSON)
    args, kwargs, _embed = message.decoded_body()
    assert args == values
    assert kwargs == {"k": decimal.Decimal("1.10")}
    assert message.headers["id"] == "f"
    assert message.headers["task"] == "t"
    assert (message.exchange, message.routing_key, message.queue) == ("", "q", "q")
    assert message.serializer == "json"


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
    message = unpack(APP, _pack(_message([1], {}, **options)), JSON)
    # Then the message carries them as Celery's own publish would
    assert message.headers["root_id"] == "r"
    assert message.headers["parent_id"] == "p"
    assert message.headers["timelimit"] == [30, 20]
    assert message.headers["custom"] == "kept"
    assert message.headers["argsrepr"] == "(<secret>,)"
    assert message.decoded_body()[2]["callbacks"] == options["link"]
    assert message.properties["priority"] == 7
    assert message.properties["reply_to"] == "reply-queue"
    assert message.delivery_mode == APP.conf.task_default_delivery_mode


def test_a_delivery_through_a_named_exchange_keeps_its_routing() -> None:
    message = build_message(
        APP, "t", [], {}, {"task_id": "f", "exchange": "ex", "routing_key": "rk"}, "json"
    )
    assert (message.exchange, message.routing_key, message.queue) == ("ex", "rk", None)


def test_a_json_body_is_stored_encoded_and_published_as_those_bytes() -> None:
    message = _message([1, "two"], {"k": decimal.Decimal("3.5")})
    stored = unpack(APP, _pack(message), JSON)
    # The body is the exact text kombu's JSON serializer makes of it, not re-encoded later
    content_type, content_encoding, data = dumps(message.body, serializer="json")
    assert (stored.body, stored.content_type, stored.content_encoding) == (
        data,
        content_type,
        content_encoding,
    )
    assert stored.decoded_body() == list(message.body)  # a JSON array comes back as a list


def test_a_row_whose_body_is_stored_as_a_value_is_released_as_its_message() -> None:
    # Bodies of serializers other than JSON are stored as values, encoded at release
    message = _message([2], {"x": 1})
    fields = {
        "headers": message.headers,
        "properties": message.properties,
        "body": message.body,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "queue": message.queue,
        "delivery_mode": message.delivery_mode,
    }
    _, _, data = dumps({"message": fields}, serializer="json")
    stored = unpack(APP, replace(_pack(), payload=data.encode()), JSON)
    assert stored.content_type is None  # kombu serializes it when it is published
    assert stored.body == list(message.body) and stored.decoded_body()[0] == [2]
    assert stored.headers["id"] == "f"


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
    assert planted.payload.startswith(pickle.dumps(0)[:2])  # a pickle, not JSON
    with pytest.raises(PayloadError, match="not accepted"):
        unpack(APP, planted, JSON)
    accepted = unpack(APP, planted, JSON | {"application/x-python-serialize"})
    assert list(accepted.body[0]) == []
    assert accepted.serializer == "pickle"


def test_corrupt_rows_are_reported() -> None:
    broken = replace(_pack(), payload=b"{not json")
    with pytest.raises(PayloadError, match="corrupt"):
        unpack(APP, broken, JSON)
    missing = replace(_pack(), payload=b'{"message": {"headers": {}}}')
    with pytest.raises(PayloadError, match="corrupt"):
        unpack(APP, missing, JSON)


def test_leader_id_accepts_ids_and_async_results() -> None:
    assert leader_id("abc") == "abc"
    assert leader_id(AsyncResult("xyz")) == "xyz"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "not int"),
        ({"id": "x"}, "not dict"),
        (["a", "b"], "one leader per task"),
        ("", "non-empty"),
        ("  ", "non-empty"),
        ("x" * 256, "the limit is 255"),
        (object(), "not object"),
    ],
)
def test_bad_leaders_are_clear_errors(value: object, message: str) -> None:
    with pytest.raises(InvalidLeaderError, match=message):
        leader_id(value)
    assert issubclass(InvalidLeaderError, ValueError)
