"""W6: what the store's operations cost as the follower table grows.

Park and release latency (store level, the statements a worker runs), ``status`` (the
store's ``stats()``, what ``celery causal status`` and the metrics run) and a sweep with
nothing to do (what beat runs every ``causal_sweep_interval``), with 1,000 rows waiting in
the table and then with 1,000,000. The background rows wait for leaders that have not
run; none is lost, so the sweep finds nothing to release.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.harness import Bench, Result
from benchmarks.pgstats import StatementCounts
from benchmarks.w_release import insert_rows, payload, runtime

#: Upper bounds at 1,000,000 rows (seconds).
SWEEP_LIMIT, STATUS_LIMIT = 0.010, 0.5


def _park_release(b: Bench, ops: int) -> tuple[float, float]:
    from celery_causal.store import Follower

    parks, releases = [], []
    lookback = runtime(b).settings.lookback
    body = payload(b, "w6", "bench-w6")
    run = uuid.uuid4().hex[:8]
    for j in range(ops):
        f = Follower(
            "bench-w6",
            f"{run}-f{j}",
            f"{run}-L{j}",
            "bench.causal",
            time.time(),
            body,
            "application/json",
            "utf-8",
        )
        t0 = time.perf_counter()
        b.store.park(f, lookback)
        t1 = time.perf_counter()
        record = b.store.record_done_and_claim("bench-w6", f.leader_id, 500)
        b.store.finish(record.claimed)
        t2 = time.perf_counter()
        parks.append(t1 - t0)
        releases.append(t2 - t1)
    return statistics.median(parks), statistics.median(releases)


def _median_time(times: int, op: Callable[[], Any]) -> float:
    spent = []
    for _ in range(times):
        t0 = time.perf_counter()
        op()
        spent.append(time.perf_counter() - t0)
    return statistics.median(spent)


def _measure(b: Bench, ops: int, reads: int) -> dict[str, Any]:
    park, release = _park_release(b, ops)
    status_counts, sweep_counts = StatementCounts(), StatementCounts()
    with b.measuring(status_counts):
        status = _median_time(reads, b.store.stats)
    sweeper = runtime(b)
    with b.measuring(sweep_counts):
        sweep = _median_time(reads, sweeper.sweep)
    return {
        "park": park,
        "release": release,
        "status": status,
        "sweep": sweep,
        "status_statements": status_counts.per_task(reads),
        "sweep_statements": sweep_counts.per_task(reads),
    }


def w6(b: Bench, big: int, ops: int, reads: int) -> Result:
    def background(n: int, start: int = 0) -> None:
        insert_rows(b, n, lost=False, scope="bench-bg", prefix="bg-", queue="bench-w6", start=start)

    background(1000)
    b.settle_table()
    small = _measure(b, ops, reads)
    background(big - 1000, start=1000)
    settled = b.settle_table()
    large = _measure(b, ops, reads)
    keys = ("park", "release", "status", "sweep")
    ratios = {k: large[k] / small[k] for k in keys}
    ok = (
        max(ratios.values()) <= 1.2
        and large["sweep"] <= SWEEP_LIMIT
        and large["status"] <= STATUS_LIMIT
    )
    ms = {k: f"{small[k] * 1e3:.2f} -> {large[k] * 1e3:.2f} ms" for k in keys}
    return Result(
        "W6",
        f"store operations, {big:,} vs 1,000 rows",
        "; ".join(f"{k} x{ratios[k]:.2f} ({ms[k]})" for k in keys),
        "each <= 1.2x; empty sweep <= 10 ms, status <= 0.5 s at 1,000,000",
        ok,
        {"small": small, "large": large, "ratios": ratios, "statistics": settled},
    )
