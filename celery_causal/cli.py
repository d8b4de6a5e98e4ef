"""``celery -A proj causal ...``: inspect and operate the follower table.

Registered in the ``celery.commands`` entry point group, so it runs with the app given by
``-A`` like Celery's own commands.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from .cli_common import (
    EX_CONFIG,
    CommandError,
    age,
    find_scope,
    one_line_errors,
    runtime_of,
    table,
)
from .cli_show import show
from .errors import CausalError
from .forget import forget as forget_follower
from .metrics import (
    EXTRA,
    UP,
    gauges,
    have_prometheus_client,
    last_success_in,
    prometheus_text,
    write_textfile,
)
from .runtime import CausalRuntime
from .settings import mask_url
from .store import ScopeStats


@click.group(name="causal")
def causal() -> None:
    """Inspect and operate celery-causal's parked (deferred) tasks."""


causal.add_command(show)


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


@causal.command()
@click.option(
    "-j", "--json", "as_json", is_flag=True, help="Print JSON for scripts and monitoring."
)
@click.option("--prometheus", is_flag=True, help="Print gauges in Prometheus text format.")
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False),
    help="Write the gauges to this .prom file for node_exporter's textfile collector, "
    f"replacing it at once (needs {EXTRA}); a failed run writes {UP} 0.",
)
@click.pass_context
@one_line_errors
def status(ctx: click.Context, as_json: bool, prometheus: bool, textfile: str | None) -> None:
    """Per scope: waiting followers, oldest, overdue for the sweep, stuck releasing."""
    chosen = [
        name
        for name, given in (
            ("--json", as_json),
            ("--prometheus", prometheus),
            ("--textfile", textfile),
        )
        if given
    ]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} are different outputs: choose one")
    if textfile is not None:
        _write_textfile(ctx, textfile)
        return
    runtime = runtime_of(ctx)
    settings = runtime.settings
    stats = runtime.store.stats(settings.release_timeout)
    rows = _scope_rows(stats, runtime.store.clock())
    if prometheus:
        text = prometheus_text(gauges(rows, up=True, last_success=time.time()))
        click.echo(text, nl=False)
        return
    if as_json:
        click.echo(json.dumps({"store": mask_url(settings.store_url), "scopes": rows}, indent=2))
        return
    click.echo(f"store: {mask_url(settings.store_url)}")
    if not rows:
        click.echo("no parked followers")
        return
    click.echo(
        table(
            ["scope", "waiting", "oldest", "overdue", "releasing", "stuck", "dead"],
            [
                [
                    r["scope"],
                    str(r["waiting"]),
                    age(r["oldest_age_seconds"]),
                    str(r["overdue"]),
                    str(r["releasing"]),
                    str(r["stuck"]),
                    str(r["dead"]),
                ]
                for r in rows
            ],
        )
    )


def _write_textfile(ctx: click.Context, path: str) -> None:
    if not have_prometheus_client():
        raise CommandError(f"--textfile needs prometheus_client: pip install '{EXTRA}'", EX_CONFIG)
    try:
        try:
            runtime = runtime_of(ctx)
            stats = runtime.store.stats(runtime.settings.release_timeout)
            rows = _scope_rows(stats, runtime.store.clock())
        except CausalError:
            # The file says the run failed, rather than keep the last good counts as if
            # they were current; the last success stays, for an alert on its age.
            write_textfile(path, gauges([], up=False, last_success=last_success_in(path)))
            raise
        write_textfile(path, gauges(rows, up=True, last_success=time.time()))
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


# -- list -----------------------------------------------------------------------------


@causal.command(name="list")
@click.option("--scope", help="Only followers of this scope.")
@click.option("--leader", help="Only followers of this leader task id.")
@click.option("--key", help="Only tasks sent under this ordering key, and the key's newest.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Rows at most."
)
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def list_(
    ctx: click.Context,
    scope: str | None,
    leader: str | None,
    key: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Parked followers, oldest first."""
    runtime = runtime_of(ctx)
    infos = runtime.store.list_followers(scope, leader, limit, key=key)
    if key is not None and not as_json:
        for line in key_lines(runtime, key, scope):
            click.echo(line)
    if len(infos) == limit:
        total = runtime.store.count_parked(scope, leader, key=key)
        if total > limit:  # on stderr: the listing itself, text or JSON, stays as it was
            click.echo(f"showing {limit} of {total}, oldest first; use --limit for more", err=True)
    now = runtime.store.clock()
    rows: list[dict[str, Any]] = [
        {
            "scope": i.scope,
            "follower_id": i.follower_id,
            "task": i.task_name,
            "leader_id": i.leader_id,
            "age_seconds": round(now - i.parked_at, 3),
            "state": "waiting" if i.claimed_at is None else "releasing",
            "ordering_key": i.ordering_key,
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
        table(
            ["scope", "follower id", "task", "leader id", "age", "state"],
            [
                [
                    r["scope"],
                    r["follower_id"],
                    r["task"],
                    r["leader_id"],
                    age(r["age_seconds"]),
                    r["state"],
                ]
                for r in rows
            ],
        )
    )


def key_lines(runtime: CausalRuntime, key: str, scope: str | None) -> list[str]:
    """Where an ordering key stands: its newest task in each scope where it is in use."""
    tails = runtime.store.key_tails(key, scope)
    if not tails:
        where = f" in scope {scope!r}" if scope is not None else ""
        return [f"key {key!r} is free{where}: its next send runs at once"]
    now = runtime.store.clock()
    lines = []
    for tail in tails:
        follows = f"follows {tail.previous}" if tail.previous else "sent when the key was free"
        lines.append(
            f"key {key!r} (scope {tail.scope!r}): newest task {tail.task_id} ({follows}), "
            f"recorded {age(now - tail.recorded_at)} ago"
        )
    return lines


# -- sweep, release, forget, migrate --------------------------------------------------


@causal.command()
@click.pass_context
@one_line_errors
def sweep(ctx: click.Context) -> None:
    """Release lost followers now (what the beat job does)."""
    runtime = runtime_of(ctx)
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


@causal.command()
@click.argument("follower_id")
@click.option("--scope", help="The follower's scope (needed if the id is in several).")
@click.pass_context
@one_line_errors
def release(ctx: click.Context, follower_id: str, scope: str | None) -> None:
    """Re-enqueue one parked follower now, without waiting for its leader."""
    runtime = runtime_of(ctx)
    scope = find_scope(runtime, follower_id, scope)
    claimed = runtime.release_one(scope, follower_id)
    if claimed is None:
        raise CommandError(f"no parked follower {follower_id!r} in scope {scope!r}")
    click.echo(f"released {follower_id} ({claimed.task_name}, scope {scope!r})")


@causal.command()
@click.argument("follower_id")
@click.option("--scope", help="The follower's scope (needed if the id is in several).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@one_line_errors
def forget(ctx: click.Context, follower_id: str, scope: str | None, yes: bool) -> None:
    """Drop one parked follower without running it; it ends REVOKED."""
    runtime = runtime_of(ctx)
    scope = find_scope(runtime, follower_id, scope)
    if not yes:
        click.confirm(
            f"Drop follower {follower_id} (scope {scope!r}) without running it?", abort=True
        )
    if forget_follower(runtime, scope, follower_id) is None:
        raise CommandError(f"no parked follower {follower_id!r} in scope {scope!r}")
    click.echo(f"forgot {follower_id} (scope {scope!r}); it will not run and is REVOKED")


@causal.command()
@click.pass_context
@one_line_errors
def migrate(ctx: click.Context) -> None:
    """Create the tables and indexes if missing, drop obsolete ones, and report what was done."""
    runtime = runtime_of(ctx, schema=False)
    click.echo(f"store: {mask_url(runtime.settings.store_url)}")
    done = runtime.store.create_schema()
    for line in done:
        click.echo(line)
    if not done:
        click.echo("schema is up to date: nothing to create")
