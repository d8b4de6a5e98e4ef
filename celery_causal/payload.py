"""Turning a task's request into a storable message, and back into a publish call.

The message is stored serialized by the task's own serializer (JSON by default, whose Celery
extensions keep datetime, UUID, Decimal and bytes), so a released task receives exactly the
arguments it would have received. Reading it back goes through kombu with an explicit list of
accepted content types: a row whose content type is not accepted (pickle, unless the app
accepts it) is refused, never deserialized.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads

from .errors import InvalidIdError, InvalidLeaderError, PayloadError
from .store import MAX_ID_LENGTH, Follower

# Headers celery-causal adds to a task message. They travel with the message through
# retries and re-enqueues, like any custom Celery header.
FOLLOWS = "causal_follows"
PUBLISHED_AT = "causal_published_at"
RELEASED = "causal_released"
DEPTH = "causal_depth"

# Execution options that describe one delivery, not the task: never replayed.
_DELIVERY_ONLY = frozenset({"redelivered", "eta", "countdown"})


def check_id(value: str, what: str, error: type[InvalidIdError] = InvalidIdError) -> str:
    """``value`` if the store can hold it as a task id, leader id or scope."""
    if not value.strip():
        raise error(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise error(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if "\x00" in value:
        raise error(f"{what} contains a NUL character, which PostgreSQL cannot store")
    return value


def leader_id(follows: object) -> str:
    """The leader's task id from a ``follows`` value: a task id or an ``AsyncResult``."""
    value = follows
    if not isinstance(value, str) and hasattr(value, "id") and not isinstance(value, type):
        value = value.id
    if not isinstance(value, str):
        raise InvalidLeaderError(
            f"follows must be a task id (str) or an AsyncResult, not {type(follows).__name__}"
            + (" (one leader per task)" if isinstance(follows, (list, tuple, set)) else "")
        )
    return check_id(value, "follows", InvalidLeaderError)


@dataclass(frozen=True)
class Message:
    """A stored follower, decoded and ready to publish again."""

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]


def execution_options(request: Any) -> dict[str, Any]:
    """Everything ``send_task`` needs to publish ``request`` again as it was sent.

    Same fields as Celery's own ``Task.retry`` keeps (ids, callbacks, chain, chord, limits,
    custom headers) plus the routing of the delivery, so the message returns to its queue.
    """
    options = {k: v for k, v in request.as_execution_options().items() if v is not None}
    options["headers"] = dict(options.get("headers") or {})
    ignore_result = request.ignore_result
    if ignore_result:
        options["ignore_result"] = True
    delivery = request.delivery_info or {}
    if delivery.get("priority") is not None:
        options["priority"] = delivery["priority"]
    exchange, routing_key = delivery.get("exchange"), delivery.get("routing_key")
    if not exchange and routing_key:
        options["queue"] = routing_key
    else:
        if exchange:
            options["exchange"] = exchange
        if routing_key:
            options["routing_key"] = routing_key
    for key in _DELIVERY_ONLY:
        options.pop(key, None)
    return options


def pack(
    *,
    scope: str,
    task_name: str,
    task_id: str,
    leader: str,
    occurred_at: float,
    args: Any,
    kwargs: Any,
    options: Mapping[str, Any],
    serializer: str,
    max_bytes: int,
    hostname: str = "",
) -> Follower:
    """Serialize a follower's message; raise :class:`PayloadError` if it cannot be stored."""
    body = {"args": list(args or ()), "kwargs": dict(kwargs or {}), "options": dict(options)}
    try:
        content_type, content_encoding, data = dumps(body, serializer=serializer)  # type: ignore[no-untyped-call]
    except (EncodeError, TypeError, ValueError) as exc:
        raise PayloadError(
            f"cannot store follower {task_id} of {task_name}: its message does not serialize "
            f"with {serializer!r}: {exc}"
        ) from exc
    payload = data.encode(content_encoding or "utf-8") if isinstance(data, str) else bytes(data)
    if len(payload) > max_bytes:
        raise PayloadError(
            f"cannot park follower {task_id} of {task_name}: its message is {len(payload)} "
            f"bytes, over causal_max_payload_bytes ({max_bytes})"
        )
    return Follower(
        scope=scope,
        follower_id=task_id,
        leader_id=leader,
        task_name=task_name,
        occurred_at=occurred_at,
        payload=payload,
        content_type=content_type,
        content_encoding=content_encoding or "binary",
        hostname=hostname,
    )


def unpack(follower: Follower, accept: Collection[str]) -> Message:
    """Decode a stored follower; only content types in ``accept`` are deserialized."""
    try:
        body = loads(  # type: ignore[no-untyped-call]
            follower.payload,
            follower.content_type,
            follower.content_encoding,
            accept=accept,
        )
        return Message(
            task_name=follower.task_name,
            args=list(body["args"]),
            kwargs=dict(body["kwargs"]),
            options=dict(body["options"]),
        )
    except ContentDisallowed as exc:
        raise PayloadError(
            f"refusing stored follower {follower.follower_id}: content type "
            f"{follower.content_type!r} is not accepted ({exc})"
        ) from exc
    except (DecodeError, KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"stored follower {follower.follower_id} is corrupt: {exc!r}") from exc
