"""Which apps ``install`` wired, and each one's runtime, built on first use.

Both maps hold their app weakly and a runtime holds its app weakly too, so an app a test
suite or a producer drops is freed with its store's connections.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

from .errors import ConfigurationError, NotInstalledError
from .runtime import CausalRuntime
from .settings import CausalSettings
from .sql import open_store
from .store import CausalStore

#: Exit status of a worker or beat whose causal settings are wrong (sysexits.h EX_CONFIG).
EX_CONFIG = 78

_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_runtimes: weakref.WeakKeyDictionary[Any, CausalRuntime] = weakref.WeakKeyDictionary()


def register(app: Any, options: dict[str, Any]) -> bool:
    """Note ``app`` as installed with ``options``; ``True`` the first time. A second
    install replaces the options and drops the runtime, built again on next use."""
    with _lock:
        first = app not in _installed
        _installed[app] = options
        _runtimes.pop(app, None)
        return first


def install_options(app: Any) -> dict[str, Any]:
    options = _installed.get(app)
    if options is None:
        raise NotInstalledError(f"celery_causal.install(app) was not called for app {app.main!r}")
    return options


def _open(app: Any, *, create_schema: bool) -> CausalRuntime:
    settings = CausalSettings.from_conf(app.conf)
    store: CausalStore | None = install_options(app).get("store")
    if store is None:
        store = open_store(
            settings.store_url,
            create_schema=create_schema,
            transaction_pooler=settings.store_transaction_pooler,
        )
    return CausalRuntime(app, settings, store)


def runtime_for(app: Any) -> CausalRuntime:
    """The app's causal runtime, built on first use from ``app.conf``."""
    runtime = _runtimes.get(app)
    if runtime is not None:
        return runtime
    with _lock:
        runtime = _runtimes.get(app)
        if runtime is None:
            runtime = _runtimes[app] = _open(app, create_schema=True)
        return runtime


def operator_runtime(app: Any) -> CausalRuntime:
    """A runtime of its own for the ``celery causal`` commands, whose store never creates
    the schema: pointed at a mistyped database, a command must say that the tables are
    missing, not create them there (only ``migrate`` creates them, by asking to)."""
    return _open(app, create_schema=False)


def runtime_or_exit(app: Any) -> CausalRuntime:
    """The app's runtime, for a worker or beat starting up; exit at once if a setting is wrong.

    Celery would print a worker's ConfigurationError with its whole traceback, and beat's
    would be logged and swallowed by the signal dispatch, beat running on without the
    sweep. A wrong setting is the operator's to fix: one line on stderr, and the exit
    status of a configuration error (sysexits' EX_CONFIG, as ``celery causal`` uses).
    SystemExit passes through Celery's signal dispatch, which catches only Exception.
    """
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EX_CONFIG) from None
