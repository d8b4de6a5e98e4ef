"""The ``causal_*`` settings, read once from ``app.conf`` into a frozen, validated model."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigurationError

PREFIX = "causal_"

#: With no ``causal_store_url`` the store is this SQLite file in the working directory.
DEFAULT_STORE_URL = "sqlite:///celery_causal.sqlite3"

SUPPORTED_SCHEMES = ("postgresql", "sqlite")

#: The one driver of each backend the store runs on; "" is a URL that names none.
#: SQLAlchemy reads a bare ``postgresql://`` as psycopg2, which is not a dependency:
#: the store gives it psycopg 3, the driver it is tested with.
_DRIVERS = {
    "postgresql": {"": "postgresql+psycopg", "psycopg": "postgresql+psycopg"},
    "sqlite": {"": "sqlite", "pysqlite": "sqlite+pysqlite"},
}
_FORMS = {
    "postgresql": "postgresql+psycopg://user:password@host/dbname (psycopg 3)",
    "sqlite": "sqlite:///path/to/file.sqlite3",
}


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, for logs, errors and CLI output."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: hide everything between "//" and "@"
        return re.sub(r"//[^@/]*@", "//***@", url)


def engine_url(url: str) -> URL:
    """The SQLAlchemy URL the store connects with; ``ValueError`` naming the supported form.

    Checked where the URL is read, so a driver that is not installed is a settings error
    and not an import error deep in the first connection.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; use {_FORMS['postgresql']}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"unsupported scheme {backend!r}; use postgresql+psycopg://... or sqlite:///..."
        )
    drivername = _DRIVERS[backend].get(driver)
    if drivername is None:
        raise ValueError(f"the {backend} driver {driver!r} is not supported; use {_FORMS[backend]}")
    return parsed.set(drivername=drivername)


def _seconds(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


class CausalSettings(BaseModel):
    """Validated ``causal_*`` settings; durations are in seconds (numbers or timedeltas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: SQLAlchemy URL of the store; PostgreSQL (``postgresql+psycopg://``) or SQLite.
    store_url: str = DEFAULT_STORE_URL
    #: PostgreSQL is reached through a transaction-pooling proxy (PgBouncer's
    #: ``pool_mode = transaction``): no prepared statements, no start-up options.
    store_transaction_pooler: bool = False
    #: A follower younger than this waits for its leader; a parked one older is lost.
    lookback: float = Field(default=15 * 60, gt=0)
    #: How long a "done" record answers duplicate and leader checks.
    seen_ttl: float = Field(default=30 * 60, gt=0)
    #: Release generations that may cascade from one leader; ``None`` disables the guard.
    max_depth: int | None = Field(default=20, ge=0)
    #: Most leaders one task may follow (``follows=[...]``); more is refused at send time.
    max_leaders: int = Field(default=100, ge=1, le=10_000)
    #: Celery beat runs the sweep this often.
    sweep_interval: float = Field(default=30, gt=0)
    #: A row left in "releasing" longer than this (its releaser died) is republished by the sweep.
    release_timeout: float = Field(default=60, gt=0)
    #: Rows claimed per statement when a leader releases its followers or the sweep runs.
    batch_size: int = Field(default=500, ge=1, le=100_000)
    #: What happens to the followers of a leader that failed for good.
    on_leader_failure: Literal["wait", "release", "fail"] = "wait"
    #: A follower whose stored message would be larger than this is refused.
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: First countdown of the Celery retry when the store cannot be reached; each further
    #: retry waits twice as long, up to ``store_retry_max_delay`` (with jitter).
    store_retry_delay: float = Field(default=1, ge=0)
    #: Longest countdown of a store-outage retry.
    store_retry_max_delay: float = Field(default=60, ge=0)
    #: Entries of the per-process cache of leaders known to be done.
    seen_cache_size: int = Field(default=10_000, ge=0)
    #: Which deliveries of a task *without* ``follows`` are checked against the done
    #: records before running: "always" (every delivery, one store round trip each) or
    #: "redelivered" (only those the broker flags as redelivered, as Celery's own
    #: ``worker_deduplicate_successful_tasks`` does). Followers and released messages are
    #: always checked: their leader check answers both questions in one round trip.
    deduplicate: Literal["always", "redelivered"] = "always"
    #: Longest time a prefork worker's main process holds a follower whose leader is
    #: running in the same worker, instead of handing it to the pool to park; 0 never holds.
    local_hold: float = Field(default=1, ge=0)
    #: Longest time that main process holds a follower whose leader has not reached the
    #: worker, in case it is about to (a follower delivered just before its leader); a
    #: follower whose leader finished in the worker is not held. 0 never holds.
    local_lookahead: float = Field(default=0.05, ge=0)

    _durations = field_validator(
        "lookback",
        "seen_ttl",
        "sweep_interval",
        "release_timeout",
        "store_retry_delay",
        "store_retry_max_delay",
        "local_hold",
        "local_lookahead",
        mode="before",
    )(_seconds)

    @field_validator("store_url")
    @classmethod
    def _supported_url(cls, url: str) -> str:
        engine_url(url)
        return url

    @model_validator(mode="after")
    def _settings_agree(self) -> CausalSettings:
        if self.seen_ttl < self.lookback:
            raise ValueError(
                f"causal_seen_ttl ({self.seen_ttl:g}s) must be at least causal_lookback "
                f"({self.lookback:g}s): a leader's done record must outlive the wait "
                "of its followers"
            )
        if self.store_retry_max_delay < self.store_retry_delay:
            raise ValueError(
                f"causal_store_retry_max_delay ({self.store_retry_max_delay:g}s) must be at "
                f"least causal_store_retry_delay ({self.store_retry_delay:g}s)"
            )
        return self

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> CausalSettings:
        """Read every ``causal_*`` key of a Celery ``app.conf``; raise one clear error if wrong."""
        values: dict[str, Any] = {}
        for key in list(conf.keys()):
            if isinstance(key, str) and key.startswith(PREFIX):
                value = conf.get(key)
                if value is not None or key == PREFIX + "max_depth":
                    values[key[len(PREFIX) :]] = value
        if values.get("store_url") is None:
            values.pop("store_url", None)
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            names = ", ".join(PREFIX + name for name in unknown)
            known = ", ".join(PREFIX + name for name in cls.model_fields)
            raise ConfigurationError(f"unknown setting {names}; known settings: {known}")
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if not where:
            # A rule across settings names the settings and values itself; its input is
            # every setting, the store URL (and its password) among them.
            problems.append(message)
            continue
        name = PREFIX + where
        given = error.get("input")
        if where == "store_url" and isinstance(given, str):
            given = mask_url(given)
        problems.append(f"{name}: {message} (got {given!r})")
    return "invalid celery-causal settings: " + "; ".join(problems)
