"""W4 and W5: releasing many parked followers at once, against plain Celery's publish rate.

Both are given against plain Celery's own publish rate measured in the same run
(``apply_async`` of plain tasks to a queue nobody consumes), the ceiling a release that
went through ``apply_async`` would have.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
from sqlalchemy import text

from benchmarks.harness import Bench, Result, WorkerConfig, budget
from benchmarks.pgstats import StatementCounts


class PeakSampler:
    """The highest value ``read`` gave while the block ran, sampled every 20 ms."""

    def __init__(self, read: Callable[[], dict[int, int]]) -> None:
        self.read = read
        self.before = read()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mb(self) -> float:
        return max(self.peak[k] - self.before.get(k, self.peak[k]) for k in self.peak) / 2**20


def _park_all(b: Bench, leader: str, followers: int) -> None:
    b.send(b.mod.causal, [(i, None, leader) for i in range(followers)])
    deadline = time.monotonic() + 900
    while b.admin.count_followers("bench", leader) < followers:
        if time.monotonic() > deadline:
            raise RuntimeError("followers did not park")
        time.sleep(0.05)


def w4(b: Bench, followers: int) -> Result:
    """One leader with ``followers`` parked followers: release rate, worker RSS."""
    b.use_worker(WorkerConfig())
    leader = f"w4-leader-{uuid.uuid4().hex[:8]}"
    counts = StatementCounts()
    with b.measuring(counts):
        _park_all(b, leader, followers)
        b.reset()
        with PeakSampler(b.pool_rss) as rss:
            t0 = time.perf_counter()
            b.send(b.mod.causal, [(0, leader, None)])
            while b.admin.stats():  # every follower claimed, published and deleted
                time.sleep(0.005)
            released = time.perf_counter()
            t1 = b.wait_count(followers + 1)
    stmts = b.record_statements(
        "W4",
        "parked followers of one leader, whole life",
        counts,
        followers + 1,
        budget(counts, independent=1, followers=followers, deduplicate="always"),
    )
    release_rate = followers / (released - t0)
    ceiling = b.publish_ceiling(min(followers, 5000))
    growth = rss.growth_mb()
    return Result(
        "W4",
        f"1 leader, {followers:,} parked followers",
        f"released {release_rate:,.0f}/s = {release_rate / ceiling:.2f} x plain publish "
        f"{ceiling:,.0f}/s; all ran {followers / (t1 - t0):,.0f}/s; RSS +{growth:.1f} MB",
        ">= 4 x plain publish; RSS <= +50 MB",
        release_rate >= 4 * ceiling and growth <= 50,
        {
            "release_s": released - t0,
            "done_s": t1 - t0,
            "rss_growth_mb": growth,
            "plain_publish_per_s": ceiling,
            "statements": stmts,
        },
    )


def payload(b: Bench, task_id: str, queue: str) -> bytes:
    """A follower's stored message as a worker builds it when it parks."""
    from celery_causal.payload import build_message, pack

    message = build_message(
        b.mod.app, "bench.causal", [0], {}, {"task_id": task_id, "queue": queue}, "json"
    )
    return pack(
        scope="bench",
        task_name="bench.causal",
        task_id=task_id,
        leader="leader",
        occurred_at=0.0,
        message=message,
        max_bytes=1 << 20,
    ).payload


def runtime(b: Bench) -> Any:
    """The bench app's causal runtime in this process (its settings, its store)."""
    from celery_causal.task import runtime_for

    return runtime_for(b.mod.app)


INSERT_ROWS = (
    "INSERT INTO causal_followers (scope, follower_id, leader_id, task_name, occurred_at, "
    "parked_at, lookback, deadline, content_type, content_encoding, payload, hostname) "
    "SELECT :scope, :prefix || g, :leader || (g % :leaders), 'bench.causal', g, "
    "extract(epoch from now()) - :age, :lookback, extract(epoch from now()) - :age + :lookback, "
    "'application/json', 'utf-8', "
    "convert_to(replace(convert_from(:p, 'UTF8'), '@ID@', :prefix || g), 'UTF8'), '' "
    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g"
)


def insert_rows(
    b: Bench, n: int, *, lost: bool, scope: str, prefix: str, queue: str, start: int = 0
) -> None:
    """Park ``n`` followers as workers store them, as the superuser (not counted).

    The task id in the stored message is a placeholder the INSERT replaces, so each row is
    a distinct task (ids ``prefix`` + ``start + 1`` on). Lost rows parked longer ago than
    their lookback; others just now.
    """
    lookback = runtime(b).settings.lookback
    step = 100_000  # bounded transactions: the server's WAL and memory stay at defaults
    with b.admin.engine.connect() as conn:
        for first in range(start + 1, start + n + 1, step):
            conn.execute(
                text(INSERT_ROWS),
                {
                    "scope": scope,
                    "prefix": prefix,
                    "leader": "gone-" if lost else "bg-leader-",
                    "leaders": 100 if lost else 50_000,
                    "age": lookback + 100_000 if lost else 0,
                    "lookback": lookback,
                    "p": payload(b, "@ID@", queue),
                    "first": first,
                    "last": min(start + n, first + step - 1),
                },
            )
            conn.commit()


def w5(b: Bench, n: int) -> Result:
    """``n`` lost followers, one sweep in this process: release rate, RSS."""
    queue = "bench-lost"  # nobody consumes it: the sweep's publishing is what is measured
    insert_rows(b, n, lost=True, scope="bench-lost", prefix="lost-", queue=queue)
    settled = b.settle_table()
    me = psutil.Process()
    counts = StatementCounts()
    with b.measuring(counts), PeakSampler(lambda: {0: me.memory_info().rss}) as rss:
        t0 = time.perf_counter()
        report = runtime(b).sweep()
        elapsed = time.perf_counter() - t0
    queued = b.redis.llen(f"{b.prefix}{queue}")
    b.redis.delete(f"{b.prefix}{queue}")
    stmts = b.record_statements(
        "W5", "sweep's share of a lost follower (claim, delete)", counts, n, 1.0
    )
    rate = report.released / elapsed
    ceiling = b.publish_ceiling(min(n, 5000))
    growth = rss.growth_mb()
    return Result(
        "W5",
        f"{n:,} lost followers, one sweep",
        f"released {rate:,.0f}/s = {rate / ceiling:.2f} x plain publish {ceiling:,.0f}/s; "
        f"RSS +{growth:.1f} MB; {queued:,} published",
        ">= 6 x plain publish; flat memory",
        report.released == n == queued and rate >= 6 * ceiling and growth <= 50,
        {
            "seconds": elapsed,
            "plain_publish_per_s": ceiling,
            "statistics": settled,
            "statements": stmts,
        },
    )
