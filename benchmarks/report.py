"""The run's tables: targets (same-run ratios) and the store's statements per task."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import ROOT, Result, StatementRow


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (modified)" if git("status", "--porcelain", "--", ".") else "")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(postgres: str, quick: bool) -> dict[str, Any]:
    import celery
    import kombu

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": _commit(),
        "machine": f"{os.cpu_count()} cores ({_cpu()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()}",
        "software": f"Python {platform.python_version()}, Celery {celery.__version__}, "
        f"kombu {kombu.__version__}, PostgreSQL {postgres} (own cluster, defaults + "
        "pg_stat_statements)",
        "quick": quick,
    }


def targets_table(results: list[Result], rows: list[StatementRow], quick: bool) -> list[str]:
    """One line per workload: its same-run figure against its target, and the store's
    statements per task against their budget."""
    by_id = {row.id: row for row in rows}
    lines = [
        "| id | workload | measured | target | statements / task (budget); PG ms / task | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        row = by_id.get(r.id)
        stmts = "-"
        if row is not None:
            p = row.per_task
            within = "" if quick else (", within" if row.ok else ", OVER")
            stmts = (
                f"{p['statements_per_task']:.2f} (<= {row.budget:.2f}{within}); "
                f"{p['exec_ms_per_task']:.3f} ms"
            )
        met = "-" if quick or r.ok is None else ("yes" if r.ok else "no")
        lines.append(f"| {r.id} | {r.workload} | {r.measured} | {r.target} | {stmts} | {met} |")
    return lines


def statements_table(rows: list[StatementRow], quick: bool) -> list[str]:
    lines = [
        "| id | tasks | statements / task | PG exec ms / task | budget | within "
        "| by kind (per task) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row.per_task
        kinds = ", ".join(
            f"{kind} {k['per_task']:.3g} ({k['ms_per_call']:.3f} ms)"
            for kind, k in list(p["by_kind"].items())[:5]
        )
        if len(p["by_kind"]) > 5:
            kinds += f", {len(p['by_kind']) - 5} more"
        within = "-" if quick else ("yes" if row.ok else "no")
        lines.append(
            f"| {row.id} | {row.what} | {p['statements_per_task']:.2f} | "
            f"{p['exec_ms_per_task']:.3f} | <= {row.budget:.2f} | {within} | {kinds} |"
        )
    return lines


def print_report(
    head: dict[str, Any],
    results: list[Result],
    rows: list[StatementRow],
    seconds: float,
    json_path: Path | None,
) -> None:
    quick = bool(head["quick"])
    note = " (quick: tiny sizes, numbers meaningless)" if quick else ""
    print(f"\ncelery-causal benchmark, {head['date']}, commit {head['commit']}{note}")
    print(f"{head['machine']}; {head['software']}\n")
    print("\n".join(targets_table(results, rows, quick)))
    print("\nThe store's statements by kind (pg_stat_statements: calls per task, mean ms)\n")
    print("\n".join(statements_table(rows, quick)))
    print(f"\n({seconds:.0f} s)")
    if json_path is not None:
        payload = {
            "header": head,
            "results": [r.__dict__ for r in results],
            "statements": [
                {"id": r.id, "what": r.what, "budget": r.budget, **r.per_task} for r in rows
            ],
            "seconds": seconds,
        }
        json_path.write_text(json.dumps(payload, indent=2, default=str))
