"""Running a store's Hypothesis state machine (the property models) on a SQL store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine

from celery_causal.sql import SQLStore, open_store
from tests.helpers import truncate


def run_on_sql(
    machine: type[RuleBasedStateMachine],
    url: str,
    examples: int,
    attributes: Callable[[SQLStore], dict[str, Any]] = lambda store: {},
) -> None:
    """Run ``machine`` with ``examples`` examples on one store at ``url``, emptied before
    each example and after the run; ``attributes`` are class attributes set from it."""
    shared = open_store(url)

    def __init__(self: Any) -> None:
        truncate(shared)
        self.store = shared
        machine.__init__(self)

    on_sql = type(
        f"{machine.__name__}OnSQL", (machine,), {"__init__": __init__, **attributes(shared)}
    )
    on_sql.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    try:
        on_sql.TestCase().runTest()
    finally:
        truncate(shared)
        shared.close()
