"""Testing code that uses causal tasks: an in-memory store and a worker in a thread.

:class:`MemoryStore` keeps the protocol's atomicity under one lock, so a test sees the
same parking, releases and sweeps as production, with no database::

    celery_causal.install(app, store=MemoryStore(), beat=False)

:func:`start_causal_worker` runs a worker for such an app in a thread (solo pool), and
:func:`parked` lists what waits in its store. The pytest plugin (registered when the
package is installed) wraps them as fixtures: ``causal_memory_store``,
``causal_celery_app`` and ``causal_celery_worker``.
"""

from __future__ import annotations

from .memory_store import MemoryStore
from .worker import parked, start_causal_worker

__all__ = ["MemoryStore", "parked", "start_causal_worker"]
