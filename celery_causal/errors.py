"""Exceptions raised by celery-causal.

Every exception derives from :class:`CausalError`; its docstring is the default message.
"""

from __future__ import annotations


class CausalError(Exception):
    """A celery-causal error occurred."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(CausalError):
    """A causal_* setting has a wrong value."""


class NotInstalledError(CausalError):
    """celery_causal.install(app) was not called for this Celery app."""


class NotCausalError(CausalError, TypeError):
    """The task is not a causal task: it cannot be sent with follows=."""


class InvalidIdError(CausalError, ValueError):
    """A task id, leader id or scope that celery-causal cannot store."""


class InvalidLeaderError(InvalidIdError):
    """The value given as `follows` does not name a leader task."""


class InvalidMessageError(CausalError, ValueError):
    """A delivered task message carries a causal_* header celery-causal cannot use."""


class PayloadError(CausalError):
    """The follower's message cannot be stored for later release."""


class StoreError(CausalError):
    """The causal store (database) refused an operation."""


class SchemaMissing(StoreError):
    """The causal store has no celery-causal tables: create them with `celery causal migrate`."""


class StoreUnavailable(StoreError):
    """The causal store (database) cannot be reached."""


class ReleaseInProgress(StoreUnavailable):
    """An earlier row of this follower is still being released; it parks once it is gone.

    Internal: the task retries through the same path as a store outage, shortly.
    """


class LeaderFailed(CausalError):
    """The leader this task follows failed for good (causal_on_leader_failure = "fail")."""
