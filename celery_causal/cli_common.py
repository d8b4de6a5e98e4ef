"""What the ``celery causal`` commands share: the runtime they work on, one-line errors,
and the text layout of ages and tables."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import (
    CausalError,
    ConfigurationError,
    NotInstalledError,
    SchemaMissing,
    StoreUnavailable,
)
from .registry import EX_CONFIG as _EX_CONFIG
from .runtime import CausalRuntime
from .settings import mask_url

# sysexits.h, as Celery's own commands use them
EX_UNAVAILABLE = 69
EX_CONFIG = _EX_CONFIG

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A one-line error with the exit status Celery's commands use for its kind."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def one_line_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StoreUnavailable as exc:
            raise CommandError(str(exc), EX_UNAVAILABLE) from None
        except (ConfigurationError, NotInstalledError, SchemaMissing) as exc:
            raise CommandError(str(exc), EX_CONFIG) from None
        except CausalError as exc:
            raise CommandError(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def runtime_of(ctx: click.Context, *, schema: bool = True) -> CausalRuntime:
    """The app's runtime; with ``schema``, :class:`SchemaMissing` unless its tables exist."""
    from .registry import operator_runtime

    runtime = operator_runtime(ctx.obj.app)
    missing = runtime.store.missing_tables() if schema else []
    if missing:
        raise SchemaMissing(
            f"causal store {mask_url(runtime.settings.store_url)} has no celery-causal tables "
            f"({', '.join(missing)} missing): check causal_store_url, or create them with "
            "`celery -A <app> causal migrate`"
        )
    return runtime


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def find_scope(runtime: CausalRuntime, follower_id: str, scope: str | None) -> str:
    if scope is not None:
        return scope
    scopes = runtime.store.scopes_of(follower_id)
    if not scopes:
        raise CommandError(f"no parked follower {follower_id!r}")
    if len(scopes) > 1:
        raise CommandError(
            f"follower {follower_id!r} is parked in several scopes ({', '.join(scopes)}); "
            "pass --scope"
        )
    return scopes[0]
