"""Fault injection for the crash tests: kill the process at a named point.

Each point is an environment variable; when it holds the given value, the process exits at
once with status 137 (as if SIGKILLed), without running ``finally`` blocks or acking.
Unset in production, where the check costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("celery_causal")

#: Set to a release reason ("leader", "sweep"): die after claiming, before publishing.
CRASH_AFTER_CLAIM = "CELERY_CAUSAL_CRASH_AFTER_CLAIM"
#: Set to "1": die after storing a finished task's done record (on PostgreSQL together with
#: the claim of its first followers), before publishing any of them.
CRASH_AFTER_DONE = "CELERY_CAUSAL_CRASH_AFTER_DONE"


def crash_point(variable: str, value: str) -> None:
    if os.environ.get(variable) == value:
        logger.critical("%s=%s: killing this process", variable, value)
        os._exit(137)
