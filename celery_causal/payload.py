"""Turning a task's request into a storable message, and back into a publish call.

A parked follower is stored as the Celery message its release will publish, built once at
park time. One shape for every serializer: the row's payload is the message's envelope
(headers, properties, routing) as JSON, a newline, then the body exactly as the task's own
serializer encoded it (JSON by default, whose Celery extensions keep datetime, UUID,
Decimal and bytes); the row's content type and encoding are the body's. A release
publishes those bytes unread, so a released task receives exactly the arguments it would
have received. A row whose content type the app does not accept (pickle, unless it does)
is refused, never published or deserialized.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads, registry
from kombu.utils import json
from kombu.utils.functional import maybe_list

from .errors import InvalidIdError, InvalidLeaderError, PayloadError
from .store import MAX_ID_LENGTH, Follower

# Headers celery-causal adds to a task message. They travel with the message through
# retries and re-enqueues, like any custom Celery header.
FOLLOWS = "causal_follows"
PUBLISHED_AT = "causal_published_at"
RELEASED = "causal_released"
DEPTH = "causal_depth"
#: The serializer a producer chose for this one send (``apply_async(serializer=...)``): a
#: parked copy is stored with it, not with the task's default.
SERIALIZER = "causal_serializer"
#: The ordering key a task was sent under; the key is freed when the task finishes.
KEY = "causal_key"
#: The leader whose outcome released this message (stamped by the release).
RELEASED_BY = "causal_released_by"
#: A follower of several leaders: those that released it on earlier waits.
SEEN = "causal_leaders_seen"
#: A follower of several leaders: when it first parked (store clock). Its lookback counts
#: from there across its waits for each leader.
FIRST_PARKED = "causal_first_parked_at"

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
            f"follows must be a task id (str), an AsyncResult or a list of them, "
            f"not {type(follows).__name__}"
        )
    return check_id(value, "follows", InvalidLeaderError)


def _leader_ids(value: object) -> list[str]:
    """Task ids of a ``follows`` value; a ``GroupResult`` stands for each of its tasks
    (its own id is no task's, and nothing would ever record it)."""
    results = getattr(value, "results", None)
    if isinstance(value, (list, tuple, set, frozenset)):
        items: Any = value
    elif isinstance(results, (list, tuple)) and not isinstance(value, (str, type)):
        items = results
    else:
        return [leader_id(value)]
    return [t for item in items for t in _leader_ids(item)]


def follows_header(follows: object, max_leaders: int | None = None) -> str | list[str]:
    """The ``causal_follows`` header of a ``follows`` value: one leader's id, or the ids of
    several (a list, tuple or set of ids or ``AsyncResult`` objects, or a ``GroupResult``),
    each once."""
    ids = list(dict.fromkeys(_leader_ids(follows)))
    if not ids:
        raise InvalidLeaderError("follows is an empty list: give at least one leader")
    if max_leaders is not None and len(ids) > max_leaders:
        raise InvalidLeaderError(
            f"follows names {len(ids)} leaders; the limit is causal_max_leaders ({max_leaders})"
        )
    return ids[0] if len(ids) == 1 else ids


@dataclass(frozen=True)
class Message:
    """A follower's Celery task message, as its release publishes it.

    ``headers`` and ``properties`` are what ``send_task`` would publish, the routing the
    one the message was delivered with, and ``body`` the bytes the task's serializer made.
    Publishing it needs no router, no argument repr, no message building and no encoding,
    which is most of ``send_task``'s cost.
    """

    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    #: Declared before publishing through the default exchange, as ``send_task`` does.
    queue: str | None
    delivery_mode: Any
    body: bytes
    content_type: str
    content_encoding: str

    def decoded_body(self, accept: Collection[str]) -> Any:
        """The body as the task will receive it: ``(args, kwargs, embed)``."""
        return loads(self.body, self.content_type, self.content_encoding, accept=accept)  # type: ignore[no-untyped-call]


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
    # A task's own argument reprs (set to hide secrets from monitors) stay as they were.
    for key in ("argsrepr", "kwargsrepr"):
        value = getattr(request, key, None)
        if value is not None:
            options[key] = value
    return options


def build_message(
    app: Any,
    task_name: str,
    args: Any,
    kwargs: Any,
    options: Mapping[str, Any],
    serializer: str,
) -> Message:
    """The message ``send_task(task_name, args, kwargs, **options)`` would publish.

    Built once, when the follower parks, so that its release only publishes it again.
    ``options`` are :func:`execution_options`; the routing they carry is the delivery's,
    resolved the way ``send_task`` resolves it.
    """
    options = dict(options)
    custom_headers = options.pop("headers", None) or {}
    task_id = options.pop("task_id")
    queue = options.pop("queue", None)
    exchange = options.pop("exchange", None)
    routing_key = options.pop("routing_key", None)
    priority = options.pop("priority", None)
    callbacks = options.pop("link", None)
    errbacks = options.pop("link_error", None)
    # send_task replies to the publishing thread when the task names no reply queue.
    reply_to = options.pop("reply_to", None) or app.thread_oid
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id,
        task_name,
        list(args or ()),
        dict(kwargs or {}),
        callbacks=maybe_list(callbacks),  # type: ignore[no-untyped-call]  # as send_task does
        errbacks=maybe_list(errbacks),  # type: ignore[no-untyped-call]
        reply_to=reply_to,
        create_sent_event=False,
        **options,
    )
    headers.update(custom_headers)
    try:
        content_type, content_encoding, data = dumps(body, serializer=serializer)  # type: ignore[no-untyped-call]
    except (EncodeError, TypeError, ValueError) as exc:
        raise PayloadError(
            f"cannot store follower {task_id} of {task_name}: its message does not serialize "
            f"with {serializer!r}: {exc}"
        ) from exc
    encoding = content_encoding or "binary"
    if priority is not None:
        properties["priority"] = priority
    exchange, routing_key, delivery_mode = _routing(app, queue, exchange, routing_key)
    return Message(
        headers=headers,
        properties=properties,
        exchange=exchange or "",
        routing_key=routing_key or "",
        queue=queue,
        delivery_mode=delivery_mode or app.conf.task_default_delivery_mode,
        body=data.encode(encoding) if isinstance(data, str) else bytes(data),
        content_type=content_type,
        content_encoding=encoding,
    )


def _routing(
    app: Any, queue: str | None, exchange: str | None, routing_key: str | None
) -> tuple[str | None, str | None, Any]:
    """Exchange, routing key and delivery mode of a delivery, as ``send_task`` resolves a
    named queue's."""
    if queue is None:
        return exchange, routing_key, None
    declared = app.amqp.queues[queue]
    if declared.exchange.type == "direct":
        return "", queue, declared.exchange.delivery_mode  # the default exchange
    return declared.exchange.name, declared.routing_key, declared.exchange.delivery_mode


#: The envelope's fields: everything of a :class:`Message` but its body.
_ENVELOPE = ("headers", "properties", "exchange", "routing_key", "queue", "delivery_mode")
#: Ends the JSON envelope, which never contains a raw newline.
_END_OF_ENVELOPE = b"\n"


def pack(
    *,
    scope: str,
    task_name: str,
    task_id: str,
    leader: str,
    occurred_at: float,
    message: Message,
    max_bytes: int,
    hostname: str = "",
    ordering_key: str | None = None,
) -> Follower:
    """The row of a follower; raise :class:`PayloadError` if it cannot be stored."""
    try:
        envelope = json.dumps({name: getattr(message, name) for name in _ENVELOPE})  # type: ignore[no-untyped-call]
    except (TypeError, ValueError) as exc:
        raise PayloadError(
            f"cannot store follower {task_id} of {task_name}: its headers do not serialize "
            f"as JSON: {exc}"
        ) from exc
    payload = envelope.encode("utf-8") + _END_OF_ENVELOPE + message.body
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
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        hostname=hostname,
        ordering_key=ordering_key,
    )


def unpack(follower: Follower, accept: Collection[str]) -> Message:
    """A stored follower's message; only content types in ``accept`` are let through."""
    if follower.content_type not in accept:
        raise PayloadError(
            f"refusing stored follower {follower.follower_id}: content type "
            f"{follower.content_type!r} is not accepted"
        )
    try:
        envelope, _, body = bytes(follower.payload).partition(_END_OF_ENVELOPE)
        fields = json.loads(envelope)  # type: ignore[no-untyped-call]
        return Message(
            headers=dict(fields["headers"]),
            properties=dict(fields["properties"]),
            exchange=str(fields["exchange"]),
            routing_key=str(fields["routing_key"]),
            queue=fields["queue"],
            delivery_mode=fields["delivery_mode"],
            body=body,
            content_type=follower.content_type,
            content_encoding=follower.content_encoding,
        )
    except (ContentDisallowed, DecodeError, KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"stored follower {follower.follower_id} is corrupt: {exc!r}") from exc


def follower_of(
    app: Any,
    task: Any,
    request: Any,
    *,
    scope: str,
    leader: str,
    occurred_at: float,
    max_bytes: int,
    ordering_key: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Follower:
    """The row that parks a delivered ``request`` of ``task``: its message, as the task's
    serializer encodes it, and the routing it was delivered with; ``headers`` are added to
    its own."""
    options = execution_options(request)
    options["headers"].update(headers or {})
    try:
        message = build_message(
            app,
            task.name,
            request.args,
            request.kwargs,
            options,
            _sent_with(request) or task.serializer or app.conf.task_serializer,
        )
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"cannot park follower {request.id} of {task.name}: {exc}") from exc
    return pack(
        scope=scope,
        task_name=task.name,
        task_id=request.id,
        leader=leader,
        occurred_at=occurred_at,
        message=message,
        max_bytes=max_bytes,
        hostname=request.hostname or "",
        ordering_key=ordering_key,
    )


def _sent_with(request: Any) -> str | None:
    """The serializer the producer chose for this message, if it chose one."""
    headers = request.headers or {}
    chosen = headers.get(SERIALIZER, getattr(request, SERIALIZER, None))
    return chosen if isinstance(chosen, str) and chosen in registry.name_to_type else None
