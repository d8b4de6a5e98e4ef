"""Signals about followers, sent as Celery sends its own: connect a receiver to follow what
happens to them (a monitor, a test, a demo) instead of reading the log.

Each is sent in the process where the step happened, after it happened, with keyword
arguments only; a receiver that raises is logged by Celery and does not affect the task.

- :data:`follower_parked` (``sender``: the task): ``task_id``, ``leader_id``, ``scope``,
  once its row is stored and before its delivery is acked.
- :data:`follower_released` (``sender``: ``None``): ``task_id``, ``leader_id``, ``scope``,
  ``released_by`` (``"leader"``, ``"sweep"``, ``"cycle"``, ``"operator"`` or
  ``"leader-failed"``), once the broker holds its message (applied, in eager mode).
- :data:`duplicate_skipped` (``sender``: the task): ``task_id``, ``scope``, when a
  delivery of a task recorded done is not run again.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

follower_parked = Signal(name="follower_parked")
follower_released = Signal(name="follower_released")
duplicate_skipped = Signal(name="duplicate_skipped")

__all__ = ["duplicate_skipped", "follower_parked", "follower_released"]
