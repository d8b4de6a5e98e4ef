"""``celery -A proj causal show FOLLOWER_ID``: one parked follower's whole story."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click

from .cli_common import CommandError, age, find_scope, one_line_errors, runtime_of
from .errors import PayloadError
from .payload import FOLLOWS, SEEN, unpack
from .runtime import CausalRuntime
from .store import ParkedFollower

#: Longest argument summary printed; the task's own ``argsrepr`` is cut to this.
ARGS_WIDTH = 120

#: What each state of a leader means for its follower, for the text output.
LEADER_STATES = {
    "done": "succeeded: the follower's release is under way or due",
    "failed": "failed for good: causal_on_leader_failure applies",
    "parked": "parked itself, waiting for its own leader",
    "releasing": "parked itself and being released",
    "not-seen": "no outcome recorded: not run yet, running, failed under the 'wait' policy, "
    "or its record expired",
}


def _short(text: str) -> str:
    return text if len(text) <= ARGS_WIDTH else text[: ARGS_WIDTH - 3] + "..."


def arguments(runtime: CausalRuntime, row: ParkedFollower) -> dict[str, str]:
    """The arguments as the producer's own reprs show them (a task that hides its secrets
    from monitors with ``argsrepr`` hides them here too), cut short."""
    try:
        headers = unpack(row.as_follower(), runtime.accept).headers
    except PayloadError as exc:
        return {"args": f"unreadable: {exc}", "kwargs": ""}
    return {
        "args": _short(str(headers.get("argsrepr", "?"))),
        "kwargs": _short(str(headers.get("kwargsrepr", "?"))),
    }


def all_leaders(runtime: CausalRuntime, row: ParkedFollower) -> list[dict[str, str]]:
    """A follower of several leaders: each leader and what the store knows of it ("done",
    "failed", or "missing"; the one it is parked behind is "waited for"); empty for a
    follower of one leader."""
    try:
        headers = unpack(row.as_follower(), runtime.accept).headers
    except PayloadError:
        return []
    leaders, seen = headers.get(FOLLOWS), headers.get(SEEN) or []
    if not isinstance(leaders, list) or not all(isinstance(t, str) for t in leaders):
        return []
    lookup = runtime.store.lookup(row.scope, leaders)
    told = []
    for leader in dict.fromkeys(leaders):
        if leader == row.leader_id:
            state = "waited for"
        elif leader in lookup.done or leader in seen:
            state = "done"
        elif leader in lookup.failed:
            state = "failed"
        else:
            state = "missing"
        told.append({"id": leader, "state": state})
    return told


def leader_state(runtime: CausalRuntime, row: ParkedFollower) -> str:
    """A key of :data:`LEADER_STATES`: what the store knows of the leader (two reads)."""
    lookup = runtime.store.lookup(row.scope, [row.leader_id])
    if row.leader_id in lookup.done:
        return "done"
    if row.leader_id in lookup.failed:
        return "failed"
    leader = runtime.store.parked_follower(row.scope, row.leader_id)
    if leader is not None:
        return "parked" if leader.claimed_at is None else "releasing"
    return "not-seen"


def release_outlook(runtime: CausalRuntime, row: ParkedFollower, leader: str, now: float) -> str:
    """When and by whom the follower will be released, in the sweep's own terms."""
    if row.claimed_at is not None:
        if now - row.claimed_at > runtime.settings.release_timeout:
            return "stuck: its releaser died; the next sweep publishes it again"
        return "being published by its releaser"
    if leader in ("parked", "releasing"):
        return "waits for its leader, which is parked itself: released after it"
    if row.deadline <= now:
        return "overdue: the next sweep releases it"
    return f"the sweep releases it in {age(row.deadline - now)} unless its leader comes first"


def story(runtime: CausalRuntime, row: ParkedFollower) -> dict[str, Any]:
    now = runtime.store.clock()
    leader = leader_state(runtime, row)
    stuck = row.claimed_at is not None and now - row.claimed_at > runtime.settings.release_timeout
    return {
        "scope": row.scope,
        "follower_id": row.follower_id,
        "task": row.task_name,
        **arguments(runtime, row),
        "leader_id": row.leader_id,
        "leader_state": leader,
        "state": "waiting" if row.claimed_at is None else "releasing",
        "stuck": stuck,
        "occurred_at": row.occurred_at,
        "parked_at": row.parked_at,
        "parked_age_seconds": round(now - row.parked_at, 3),
        "lookback_seconds": row.lookback,
        "deadline": row.deadline,
        "due_in_seconds": round(row.deadline - now, 3),
        "claimed_at": row.claimed_at,
        "release": release_outlook(runtime, row, leader, now),
        "parked_by": row.hostname,
        "ordering_key": row.ordering_key,
        "leaders": all_leaders(runtime, row),
    }


def _when(epoch: float, now_age: float) -> str:
    moment = datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({age(now_age)} ago)" if now_age >= 0 else f"{moment} (in {age(-now_age)})"


def text(s: dict[str, Any]) -> str:
    parked_age = s["parked_age_seconds"]
    lines = [
        ("follower", s["follower_id"]),
        ("scope", s["scope"]),
        ("task", s["task"]),
        ("args", s["args"]),
        ("kwargs", s["kwargs"]),
        ("leader", s["leader_id"]),
        ("leader state", f"{s['leader_state']} ({LEADER_STATES[s['leader_state']]})"),
        ("state", s["state"] + (" (stuck)" if s["stuck"] else "")),
        ("parked since", _when(s["parked_at"], parked_age)),
        ("deadline", _when(s["deadline"], -s["due_in_seconds"])),
        ("release", s["release"]),
        ("parked by", s["parked_by"] or "-"),
        *([("ordering key", s["ordering_key"])] if s["ordering_key"] else []),
        *(
            [("all leaders", ", ".join(f"{t['id']} ({t['state']})" for t in s["leaders"]))]
            if s["leaders"]
            else []
        ),
    ]
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in lines)


@click.command()
@click.argument("follower_id")
@click.option("--scope", help="The follower's scope (needed if the id is in several).")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def show(ctx: click.Context, follower_id: str, scope: str | None, as_json: bool) -> None:
    """One parked follower: its task, its leader's state, and when it will be released."""
    runtime = runtime_of(ctx)
    scope = find_scope(runtime, follower_id, scope)
    row = runtime.store.parked_follower(scope, follower_id)
    if row is None:
        raise CommandError(f"no parked follower {follower_id!r} in scope {scope!r}")
    told = story(runtime, row)
    click.echo(json.dumps(told, indent=2) if as_json else text(told))
