"""celery-causal: causal ordering for Celery tasks.

A causal task sent with ``follows=<leader task id>`` runs only after its leader succeeded;
if it arrives first it is parked in the store and re-enqueued when the leader succeeds.
"""

from importlib.metadata import PackageNotFoundError, version

from .core import DEFERRED
from .errors import (
    CausalError,
    ConfigurationError,
    InvalidIdError,
    InvalidLeaderError,
    InvalidMessageError,
    LeaderFailed,
    NotCausalError,
    NotInstalledError,
    PayloadError,
    StoreError,
    StoreUnavailable,
)
from .settings import CausalSettings
from .task import CausalTask, causal_task
from .wiring import SWEEP_TASK, install

try:
    __version__ = version("celery-causal")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    # wiring
    "install",
    "causal_task",
    "CausalTask",
    "CausalSettings",
    "DEFERRED",
    "SWEEP_TASK",
    # errors
    "CausalError",
    "ConfigurationError",
    "InvalidIdError",
    "InvalidLeaderError",
    "InvalidMessageError",
    "LeaderFailed",
    "NotCausalError",
    "NotInstalledError",
    "PayloadError",
    "StoreError",
    "StoreUnavailable",
]
