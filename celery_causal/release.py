"""Publishing claimed followers back to the broker: the outbox's second half.

Rows arrive here already claimed (``claimed_at`` set). They are published in order on one
producer connection, and deleted only after the broker took them. A process that dies
between claim and delete leaves the rows claimed; the sweep republishes them after
``causal_release_timeout``, and the done-record check absorbs the duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, cast

from . import signals
from .errors import PayloadError
from .faults import CRASH_AFTER_CLAIM, crash_point
from .payload import DEPTH, RELEASED, RELEASED_BY, unpack
from .store import CausalStore, ClaimedFollower

logger = logging.getLogger("celery_causal")


@dataclass
class ReleaseReport:
    published: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def publish(
    app: Any,
    store: CausalStore,
    claimed: Sequence[ClaimedFollower],
    *,
    reason: str,
    depth: int,
    accept: Collection[str],
) -> ReleaseReport:
    """Publish ``claimed`` followers (already in release order), then delete their rows.

    ``reason`` (who released it: "leader", "sweep", "cycle" or "operator") is stamped
    into each message so it does not wait again, with the leader whose row it was (a
    follower of several leaders waits again for those not done); ``depth`` is its release
    generation.
    """
    report = ReleaseReport()
    if not claimed:
        return report
    crash_point(CRASH_AFTER_CLAIM, reason)
    sent: list[ClaimedFollower] = []  # rows handed to the producer, in order
    immediate, flushed = True, False
    try:
        with app.producer_or_acquire() as producer:
            batch = _batch(producer, len(claimed))
            immediate = batch is _IMMEDIATE
            release = _Release(app, store, producer, accept, reason, depth, report, immediate)
            with batch:
                for follower in claimed:
                    if release.send(follower):
                        sent.append(follower)
            flushed = True
    finally:
        # Only rows whose message the broker holds are deleted; the others stay claimed and
        # the sweep retries them after causal_release_timeout. Published one at a time, a
        # message is there once sent. A batch is there once it flushed on a clean exit; one
        # left by an exception discarded what it had not flushed, so none of its rows
        # counts (any the broker did get are republished later and skipped as duplicates).
        store.finish(sent if immediate or flushed else [])
    published = {follower.row_id for follower in sent}
    for follower in claimed:
        if follower.row_id in published:
            signals.follower_released.send(
                sender=None,
                task_id=follower.follower_id,
                leader_id=follower.leader_id,
                scope=follower.scope,
                released_by=reason,
            )
    return report


#: The context used when the transport publishes every message at once.
_IMMEDIATE = nullcontext()


def _batch(producer: Any, size: int) -> AbstractContextManager[Any]:
    """A publish batch of ``size`` (2 or more) messages if the transport groups publishes.

    kombu 5.7+ sends a Redis batch as one pipeline, one round trip instead of one per
    message; the pipeline keeps the release order. The batch is sized so that it never
    flushes early: it is published whole at its end, or not at all.
    """
    make = getattr(producer, "batch", None)
    if size < 2 or make is None or not getattr(producer, "supports_batch_publish", False):
        # One message is one round trip either way; a batch would also build a Redis
        # client of its own (measured: about 35 us more per single release).
        return _IMMEDIATE
    # Each message is one LPUSH, plus one PEXPIRE per priority step on a queue with
    # x-expires; a margin keeps a batch from flushing before its end.
    return cast(AbstractContextManager[Any], make(max_size=16 * size + 16))


class _Release:
    """One batch of releases on one producer: settings read once, queues declared once."""

    def __init__(
        self,
        app: Any,
        store: CausalStore,
        producer: Any,
        accept: Collection[str],
        reason: str,
        depth: int,
        report: ReleaseReport,
        immediate: bool,
    ) -> None:
        self.app, self.store, self.producer, self.accept = app, store, producer, accept
        self.stamp = {RELEASED: reason, DEPTH: depth}
        self.reason = reason
        self.report = report
        self.declared: set[str] = set()
        conf = app.conf
        self.options = {
            "compression": conf.task_compression,
            "retry": conf.task_publish_retry,
            "retry_policy": conf.task_publish_retry_policy,
        }
        # In a batch, a message for the default exchange (a queue named by its routing
        # key) is only appended: the broker is reached when the batch flushes, so kombu's
        # retry around the append could never retry anything, and it builds a wrapper for
        # each message. A failed flush leaves the batch's rows claimed: the sweep
        # publishes them again (see publish()). A named exchange is looked up on the
        # broker (kombu's Redis transport reads its bindings) and keeps the retry.
        self.append_options = {**self.options, "retry": self.options["retry"] and immediate}

    def declare(self, queue: str) -> None:
        if queue not in self.declared:
            # send_task declares the queue on every publish; once per batch is enough.
            self.producer.maybe_declare(_queue(self.app, queue))
            self.declared.add(queue)

    def declare_exchange(self, name: str) -> None:
        """Declare exchange ``name`` as the app's queues define it, if it is not direct.

        kombu's virtual transports (Redis) route a publish by the exchange type their own
        connection declared, and take an exchange they have not declared for a direct one:
        a follower delivered through a topic or fanout exchange would then match no binding
        and be dropped, after which its row is deleted as released. RabbitMQ routes by the
        type the broker knows; there the declaration is a no-op.
        """
        key = f"exchange:{name}"
        if key in self.declared:
            return
        self.declared.add(key)
        for queue in self.app.amqp.queues.values():
            exchange = queue.exchange
            if exchange is not None and exchange.name == name and exchange.type != "direct":
                self.producer.maybe_declare(exchange)
                return

    def send(self, follower: ClaimedFollower) -> bool:
        """Publish one follower's message; ``False`` if it was refused and moved aside."""
        try:
            message = unpack(follower, self.accept)
            if message.queue is not None:
                self.declare(message.queue)
            elif message.exchange:
                self.declare_exchange(message.exchange)
        except PayloadError as exc:
            bury_unreadable(self.store, follower, exc)
            self.report.refused.append(follower.follower_id)
            return False
        properties = dict(message.properties)
        expiration = _seconds_left(message.headers.get("expires"))
        if expiration is not None:
            properties["expiration"] = expiration  # a broker TTL counts from this publish
        # The stored message, published again as it is: the publish signals and the router
        # already ran when it was first sent (as for a message the broker redelivers).
        self.producer.publish(
            message.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            # With a content type, kombu publishes the encoded body as it is.
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers={**message.headers, **self.stamp, RELEASED_BY: follower.leader_id},
            delivery_mode=message.delivery_mode,
            declare=[],  # declared above, once per batch (kombu may append to this list)
            **(self.options if message.exchange else self.append_options),
            **properties,
        )
        self.report.published.append(follower.follower_id)
        logger.info(
            "released task %s (follows %s, scope %r) by %s",
            follower.follower_id,
            follower.leader_id,
            follower.scope,
            self.reason,
        )
        return True


def bury_unreadable(store: CausalStore, follower: ClaimedFollower, exc: Exception) -> None:
    """Move a follower whose message cannot be released to causal_dead_followers.

    Set aside for an operator, never deleted unseen and never run; the other followers go
    on instead of waiting behind it forever.
    """
    logger.error(
        "not releasing task %s (follows %s, scope %r): %s; moved to causal_dead_followers",
        follower.follower_id,
        follower.leader_id,
        follower.scope,
        exc,
    )
    store.bury(follower, str(exc))


def _queue(app: Any, name: str) -> Any:
    """The app's queue ``name``; a follower bound for a queue the app dropped is refused."""
    try:
        return app.amqp.queues[name]
    except KeyError:
        raise PayloadError(
            f"its queue {name!r} is not among the app's queues (task_create_missing_queues is off)"
        ) from None


def _seconds_left(expires: Any) -> float | None:
    """Seconds until an ISO ``expires`` header, at least 0; ``None`` without one."""
    if not expires:
        return None
    try:
        moment = datetime.fromisoformat(expires) if isinstance(expires, str) else expires
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return max(0.0, float((moment - datetime.now(timezone.utc)).total_seconds()))
    except (TypeError, ValueError, AttributeError):
        return None
