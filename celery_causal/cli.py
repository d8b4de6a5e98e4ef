"""``celery -A proj causal ...``: inspect and operate the follower table.

Registered in the ``celery.commands`` entry point group, so it runs with the app given by
``-A`` like Celery's own commands.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import CausalError, ConfigurationError, NotInstalledError, StoreUnavailable
from .runtime import CausalRuntime
from .settings import mask_url
from .store import ScopeStats

# sysexits.h, as Celery's own commands use them
EX_UNAVAILABLE = 69
EX_CONFIG = 78

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A one-line error with the exit status Celery's commands use for its kind."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(" ".join(message.split()))
        self.exit_code = exit_code


def _one_line_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StoreUnavailable as exc:
            raise CommandError(str(exc), EX_UNAVAILABLE) from None
        except (ConfigurationError, NotInstalledError) as exc:
            raise CommandError(str(exc), EX_CONFIG) from None
        except CausalError as exc:
            raise CommandError(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _runtime(ctx: click.Context) -> CausalRuntime:
    from .task import runtime_for

    return runtime_for(ctx.obj.app)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.group(name="causal")
def causal() -> None:
    """Inspect and operate celery-causal's parked (deferred) tasks."""


# -- status ---------------------------------------------------------------------------


def _scope_rows(stats: list[ScopeStats], now: float) -> list[dict[str, Any]]:
    return [
        {
            "scope": s.scope,
            "waiting": s.waiting,
            "oldest_age_seconds": None
            if s.oldest_parked_at is None
            else round(now - s.oldest_parked_at, 3),
            "overdue": s.overdue,
            "releasing": s.releasing,
            "stuck": s.stuck,
            "dead": s.dead,
        }
        for s in stats
    ]


_METRICS = [
    (
        "waiting",
        "celery_causal_waiting_followers",
        "Followers parked and waiting for their leader.",
    ),
    (
        "oldest_age_seconds",
        "celery_causal_oldest_waiting_age_seconds",
        "Age of the oldest waiting follower.",
    ),
    (
        "overdue",
        "celery_causal_overdue_followers",
        "Waiting followers past their deadline, or first of a ring (the next sweep releases them).",
    ),
    (
        "releasing",
        "celery_causal_releasing_followers",
        "Followers claimed for release and not yet published.",
    ),
    (
        "stuck",
        "celery_causal_stuck_followers",
        "Followers releasing longer than causal_release_timeout (their releaser died).",
    ),
    (
        "dead",
        "celery_causal_dead_followers",
        "Followers moved to causal_dead_followers: their stored message could not be read.",
    ),
]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(rows: list[dict[str, Any]]) -> str:
    """The text exposition format, one gauge family per measure, labelled by scope."""
    out: list[str] = []
    for key, name, help_text in _METRICS:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for row in rows:
            value = row[key] if row[key] is not None else 0
            out.append(f'{name}{{scope="{_label(row["scope"])}"}} {value}')
    return "\n".join(out) + "\n"


@causal.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts and monitoring.")
@click.option("--prometheus", is_flag=True, help="Print gauges in Prometheus text format.")
@click.pass_context
@_one_line_errors
def status(ctx: click.Context, as_json: bool, prometheus: bool) -> None:
    """Per scope: waiting followers, oldest, overdue for the sweep, stuck releasing."""
    runtime = _runtime(ctx)
    settings = runtime.settings
    stats = runtime.store.stats(settings.release_timeout)
    rows = _scope_rows(stats, runtime.store.clock())
    if prometheus:
        click.echo(prometheus_text(rows), nl=False)
        return
    if as_json:
        click.echo(json.dumps({"store": mask_url(settings.store_url), "scopes": rows}, indent=2))
        return
    click.echo(f"store: {mask_url(settings.store_url)}")
    if not rows:
        click.echo("no parked followers")
        return
    click.echo(
        _table(
            ["scope", "waiting", "oldest", "overdue", "releasing", "stuck", "dead"],
            [
                [
                    r["scope"],
                    str(r["waiting"]),
                    _age(r["oldest_age_seconds"]),
                    str(r["overdue"]),
                    str(r["releasing"]),
                    str(r["stuck"]),
                    str(r["dead"]),
                ]
                for r in rows
            ],
        )
    )


# -- list -----------------------------------------------------------------------------


@causal.command(name="list")
@click.option("--scope", help="Only followers of this scope.")
@click.option("--leader", help="Only followers of this leader task id.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@_one_line_errors
def list_(
    ctx: click.Context, scope: str | None, leader: str | None, limit: int, as_json: bool
) -> None:
    """Parked followers, oldest first."""
    runtime = _runtime(ctx)
    infos = runtime.store.list_followers(scope, leader, limit)
    now = runtime.store.clock()
    rows: list[dict[str, Any]] = [
        {
            "scope": i.scope,
            "follower_id": i.follower_id,
            "task": i.task_name,
            "leader_id": i.leader_id,
            "age_seconds": round(now - i.parked_at, 3),
            "state": "waiting" if i.claimed_at is None else "releasing",
        }
        for i in infos
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no parked followers")
        return
    click.echo(
        _table(
            ["scope", "follower id", "task", "leader id", "age", "state"],
            [
                [
                    r["scope"],
                    r["follower_id"],
                    r["task"],
                    r["leader_id"],
                    _age(r["age_seconds"]),
                    r["state"],
                ]
                for r in rows
            ],
        )
    )


# -- sweep, release, forget, migrate --------------------------------------------------


@causal.command()
@click.pass_context
@_one_line_errors
def sweep(ctx: click.Context) -> None:
    """Release lost followers now (what the beat job does)."""
    runtime = _runtime(ctx)
    settings = runtime.settings
    due = sum(s.overdue + s.stuck for s in runtime.store.stats(settings.release_timeout))
    if due > settings.batch_size:
        with click.progressbar(length=due, label="releasing lost followers") as bar:
            report = runtime.sweep(progress=bar.update)
    else:
        report = runtime.sweep()
    click.echo(
        f"released {report.released} lost follower(s); expired {report.expired_done} "
        f"done record(s)" + (f"; refused {report.refused} unreadable" if report.refused else "")
    )


def _find_scope(runtime: CausalRuntime, follower_id: str, scope: str | None) -> str:
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


@causal.command()
@click.argument("follower_id")
@click.option("--scope", help="The follower's scope (needed if the id is in several).")
@click.pass_context
@_one_line_errors
def release(ctx: click.Context, follower_id: str, scope: str | None) -> None:
    """Re-enqueue one parked follower now, without waiting for its leader."""
    runtime = _runtime(ctx)
    scope = _find_scope(runtime, follower_id, scope)
    claimed = runtime.release_one(scope, follower_id)
    if claimed is None:
        raise CommandError(f"no parked follower {follower_id!r} in scope {scope!r}")
    click.echo(f"released {follower_id} ({claimed.task_name}, scope {scope!r})")


@causal.command()
@click.argument("follower_id")
@click.option("--scope", help="The follower's scope (needed if the id is in several).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@_one_line_errors
def forget(ctx: click.Context, follower_id: str, scope: str | None, yes: bool) -> None:
    """Drop one parked follower without running it; it ends REVOKED."""
    from .forget import forget as forget_follower

    runtime = _runtime(ctx)
    scope = _find_scope(runtime, follower_id, scope)
    if not yes:
        click.confirm(
            f"Drop follower {follower_id} (scope {scope!r}) without running it?", abort=True
        )
    if forget_follower(runtime, scope, follower_id) is None:
        raise CommandError(f"no parked follower {follower_id!r} in scope {scope!r}")
    click.echo(f"forgot {follower_id} (scope {scope!r}); it will not run and is REVOKED")


@causal.command()
@click.pass_context
@_one_line_errors
def migrate(ctx: click.Context) -> None:
    """Create the tables and indexes if missing, and report what was done."""
    runtime = _runtime(ctx)
    click.echo(f"store: {mask_url(runtime.settings.store_url)}")
    created = runtime.store.create_schema()
    for item in created:
        click.echo(f"created {item}")
    if not created:
        click.echo("schema is up to date: nothing to create")
