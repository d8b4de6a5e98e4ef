from __future__ import annotations

import datetime
import decimal
import pickle
import uuid
from dataclasses import replace

import pytest
from celery.result import AsyncResult

from celery_causal.errors import InvalidLeaderError, PayloadError
from celery_causal.payload import leader_id, pack, unpack

JSON = {"application/json"}


def _pack(args: object = (), kwargs: object = None, **kw: object) -> object:
    base: dict[str, object] = {
        "scope": "s",
        "task_name": "t",
        "task_id": "f",
        "leader": "L",
        "occurred_at": 1.0,
        "args": args,
        "kwargs": kwargs or {},
        "options": {"task_id": "f"},
        "serializer": "json",
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
    follower = _pack(args=values, kwargs={"k": values[2]})
    message = unpack(follower, JSON)  # type: ignore[arg-type]
    assert message.args == values
    assert message.kwargs == {"k": decimal.Decimal("1.10")}
    assert message.options == {"task_id": "f"}


def test_unserializable_argument_is_a_clear_error() -> None:
    with pytest.raises(PayloadError, match="does not serialize with 'json'"):
        _pack(args=[object()])


def test_payload_over_the_limit_is_refused() -> None:
    with pytest.raises(PayloadError, match="causal_max_payload_bytes"):
        _pack(args=["x" * 5000], max_bytes=2048)


def test_pickle_rows_are_refused_unless_accepted() -> None:
    planted = replace(
        _pack(),
        payload=pickle.dumps({"args": [], "kwargs": {}, "options": {}}),  # type: ignore[type-var]
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    with pytest.raises(PayloadError, match="not accepted"):
        unpack(planted, JSON)
    assert unpack(planted, JSON | {"application/x-python-serialize"}).args == []


def test_corrupt_rows_are_reported() -> None:
    broken = replace(_pack(), payload=b"{not json")  # type: ignore[type-var]
    with pytest.raises(PayloadError, match="corrupt"):
        unpack(broken, JSON)


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
