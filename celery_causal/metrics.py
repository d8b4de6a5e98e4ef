"""Prometheus gauges of the follower table, for ``celery causal status``.

``--prometheus`` prints the text format (no dependency); ``--textfile PATH`` writes it for
node_exporter's textfile collector with ``prometheus_client`` (the ``metrics`` extra),
whose ``write_to_textfile`` writes a temporary file and renames it over PATH: a collector
never reads a half-written file, and a run that dies leaves the previous one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: (key of a status row, metric name, help). The names are the project's interface to
#: dashboards and alerts: keep them.
SCOPE_GAUGES = [
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
UP = "celery_causal_up"
LAST_SUCCESS = "celery_causal_last_success_timestamp_seconds"

#: The extra that brings prometheus_client, named in the error when it is missing.
EXTRA = "celery-causal[metrics]"


@dataclass
class Gauge:
    name: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def gauges(
    rows: Sequence[Mapping[str, Any]], *, up: bool, last_success: float | None
) -> list[Gauge]:
    """Every gauge of one run: per scope ones from ``status`` rows, then whether this run
    read the store and when a run last did (kept from the previous file after a failure,
    so an alert on its age fires however many runs fail)."""
    out = []
    for key, name, help_text in SCOPE_GAUGES:
        gauge = Gauge(name, help_text)
        for row in rows:
            value = row[key] if row[key] is not None else 0
            gauge.samples.append(({"scope": row["scope"]}, float(value)))
        out.append(gauge)
    up_help = "1 if this run read the causal store, 0 if it failed."
    out.append(Gauge(UP, up_help, [({}, float(up))]))
    if last_success is not None:
        help_text = "When a run last read the causal store (epoch seconds)."
        out.append(Gauge(LAST_SUCCESS, help_text, [({}, last_success)]))
    return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def prometheus_text(families: Sequence[Gauge]) -> str:
    """The text exposition format, one gauge family per measure."""
    out: list[str] = []
    for g in families:
        out += [f"# HELP {g.name} {g.help}", f"# TYPE {g.name} gauge"]
        for labels, value in g.samples:
            pairs = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(
                f"{g.name}{{{pairs}}} {_value(value)}" if pairs else f"{g.name} {_value(value)}"
            )
    return "\n".join(out) + "\n"


def have_prometheus_client() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class _Collected:
    """A collector that yields one run's gauges, registered in a registry of its own."""

    def __init__(self, families: Sequence[Gauge]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        for g in self.families:
            names = sorted({k for labels, _ in g.samples for k in labels})
            family = GaugeMetricFamily(g.name, g.help, labels=names)
            for labels, value in g.samples:
                family.add_metric([labels[k] for k in names], value)
            yield family


def write_textfile(path: str, families: Sequence[Gauge]) -> None:
    """Replace ``path`` with these gauges at once (write, then rename)."""
    from prometheus_client import CollectorRegistry, write_to_textfile

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))
    write_to_textfile(path, registry)


def last_success_in(path: str) -> float | None:
    """The last-success time a previous run wrote to ``path``, if it is there and readable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with open(path, encoding="utf-8") as file:
            content = file.read()
        for family in text_string_to_metric_families(content):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS and math.isfinite(sample.value):
                    return float(sample.value)
    except (OSError, ValueError):  # no previous file, or not one of ours
        return None
    return None
