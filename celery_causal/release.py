"""Publishing claimed followers back to the broker: the outbox's second half.

Rows arrive here already claimed (``claimed_at`` set). They are published in order on one
producer connection, and deleted only after the broker took them. A process that dies
between claim and delete leaves the rows claimed; the sweep republishes them after
``causal_release_timeout``, and the done-record check absorbs the duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PayloadError
from .faults import CRASH_AFTER_CLAIM, crash_point
from .payload import DEPTH, RELEASED, unpack
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

    ``reason`` ("leader" or "sweep") is stamped into each message so it does not wait
    again; ``depth`` is its release generation.
    """
    report = ReleaseReport()
    if not claimed:
        return report
    crash_point(CRASH_AFTER_CLAIM, reason)
    done_ids: list[int] = []
    try:
        with app.producer_or_acquire() as producer:
            for follower in claimed:
                try:
                    message = unpack(follower, accept)
                except PayloadError as exc:
                    # Moved aside for an operator (causal_dead_followers), never deleted
                    # unseen and never run; the other followers go on.
                    logger.error(
                        "not releasing task %s (follows %s, scope %r): %s; moved to "
                        "causal_dead_followers",
                        follower.follower_id,
                        follower.leader_id,
                        follower.scope,
                        exc,
                    )
                    store.bury(follower.row_id, str(exc))
                    report.refused.append(follower.follower_id)
                    continue
                options = dict(message.options)
                options["headers"] = {
                    **(options.get("headers") or {}),
                    RELEASED: reason,
                    DEPTH: depth,
                }
                app.send_task(
                    message.task_name,
                    args=message.args,
                    kwargs=message.kwargs,
                    producer=producer,
                    **options,
                )
                done_ids.append(follower.row_id)
                report.published.append(follower.follower_id)
                logger.info(
                    "released task %s (follows %s, scope %r) by %s",
                    follower.follower_id,
                    follower.leader_id,
                    follower.scope,
                    reason,
                )
    finally:
        # Published rows are deleted even if a later publish failed; unpublished ones stay
        # claimed and the sweep retries them after causal_release_timeout.
        store.finish(done_ids)
    return report
