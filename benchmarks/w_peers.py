"""W7 and W8: ordering as the tools users would pick instead do it.

W7: chains of 5 through Celery's canvas ``chain()`` (each link sent by the worker when the
previous one succeeded) against the same chains through ``follows``, all sent up front in
chain order and fully reversed: same bodies, same worker. Plain independent tasks are run
alongside, so that "what ordering costs" can be put next to RQ's (W8).

W8: RQ's ``depends_on`` chains of 5 against the same jobs without dependencies, through
two RQ worker processes (as prefork ``-c 2``), against the same Redis.
"""

from __future__ import annotations

import sys
import time
import uuid
from importlib import metadata
from typing import Any

from benchmarks.harness import (
    REDIS_URL,
    Bench,
    Result,
    WorkerConfig,
    budget,
    fmt_ratio,
    ratio,
    spawn,
    stop_process,
)
from benchmarks.pgstats import StatementCounts

DEPTH = 5


def _canvas(b: Bench, chains: int) -> float:
    from celery import chain

    def send() -> None:
        with b.mod.app.producer_or_acquire() as producer:
            for c in range(chains):
                links = [b.mod.plain.si(c * DEPTH + k) for k in range(DEPTH)]
                chain(*links).apply_async(producer=producer)

    return b.timed(chains * DEPTH, send)


def w7(b: Bench, chains: int, repeats: int) -> list[Result]:
    b.use_worker(WorkerConfig())
    n = chains * DEPTH
    in_order, reversed_ = StatementCounts(), StatementCounts()
    times: dict[str, list[float]] = {"canvas": [], "follows": [], "reversed": [], "plain": []}
    for _ in range(repeats):
        times["canvas"].append(_canvas(b, chains))
        with b.measuring(in_order):
            times["follows"].append(b.run_chains(chains, DEPTH, reverse=False))
        with b.measuring(reversed_):
            times["reversed"].append(b.run_chains(chains, DEPTH, reverse=True))
        times["plain"].append(b.run_plain(n))
    heads, tasks = chains * repeats, n * repeats
    stmts = {
        key: b.record_statements(
            id_,
            what,
            counts,
            tasks,
            budget(counts, independent=heads, followers=tasks - heads, deduplicate="always"),
        )
        for key, id_, what, counts in (
            ("W7", "W7", "chains sent up front, in chain order", in_order),
            ("W7c", "W7c", "chains sent up front, reversed", reversed_),
        )
    }
    follows = ratio(times["follows"], times["canvas"])
    rev = ratio(times["reversed"], times["canvas"])
    b.ordering_cost = ratio(times["follows"], times["plain"])
    return [
        Result(
            "W7",
            f"{chains:,} chains of 5: follows in chain order / canvas chain()",
            fmt_ratio("follows/chain", follows),
            "<= 1.30",
            follows[0] <= 1.30,
            {**times, "statements": stmts["W7"]},
        ),
        Result(
            "W7c",
            f"{chains:,} chains of 5: follows fully reversed / canvas chain()",
            fmt_ratio("follows reversed/chain", rev),
            "<= 2.0",
            rev[0] <= 2.0,
            {"statements": stmts["W7c"]},
        ),
    ]


class RQ:
    """Two RQ workers on a queue of the run's own; jobs count in the run's Redis prefix."""

    def __init__(self, b: Bench) -> None:
        from redis import Redis
        from rq import Queue

        self.b = b
        self.run = uuid.uuid4().hex[:8]
        self.name = f"causal-bench-{self.run}"
        self.counter = f"{b.prefix}rq-done"
        self.queue = Queue(self.name, connection=Redis.from_url(REDIS_URL))
        argv = [sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL, "-q"]
        log = b.log_dir / f"bench-rq-{self.run}.log"
        self.workers = [
            spawn([*argv, "--name", f"{self.name}-{i}", self.name], b.env, log) for i in range(2)
        ]

    def timed(self, chains: int, depends: bool) -> float:
        from benchmarks.rq_jobs import step

        self.b.redis.set(self.counter, 0)
        run = uuid.uuid4().hex[:6]
        t0 = time.perf_counter()
        for c in range(chains):
            previous: Any = None
            for k in range(DEPTH):
                previous = self.queue.enqueue(
                    step,
                    self.counter,
                    job_id=f"{self.run}-{run}-{c}-{k}",
                    depends_on=previous if depends else None,
                    result_ttl=300,
                )
        deadline = time.monotonic() + 900
        while int(self.b.redis.get(self.counter) or 0) < chains * DEPTH:
            if any(w.poll() is not None for w in self.workers):
                raise RuntimeError("an RQ worker exited")
            if time.monotonic() > deadline:
                raise RuntimeError("RQ jobs did not finish")
            time.sleep(0.002)
        return time.perf_counter() - t0

    def close(self) -> None:
        for worker in self.workers:
            stop_process(worker)
        for key in self.b.redis.scan_iter(f"rq:*{self.run}*", count=1000):
            self.b.redis.delete(key)
        self.b.redis.srem("rq:queues", f"rq:queue:{self.name}")
        self.b.redis.srem("rq:workers", *(f"rq:worker:{self.name}-{i}" for i in range(2)))


def w8(b: Bench, chains: int, repeats: int) -> Result:
    """RQ chains of 5 with depends_on / the same jobs without dependencies."""
    try:
        version = metadata.version("rq")
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            "W8 needs RQ: python -m pip install -e '.[bench]' (or leave W8 out with --only)"
        ) from None
    b.use_worker(None)  # the two cores are RQ's alone
    rq = RQ(b)
    try:
        rq.timed(4, depends=True)  # warm-up: both workers up and importing the job
        chained, plain = [], []
        for _ in range(repeats):
            plain.append(rq.timed(chains, depends=False))
            chained.append(rq.timed(chains, depends=True))
    finally:
        rq.close()
    r = ratio(chained, plain)
    mine = b.ordering_cost
    reference = f"; celery-causal follows/plain Celery (W7) = {mine[0]:.2f}" if mine else ""
    rate = chains * DEPTH * repeats / sum(plain)
    return Result(
        "W8",
        f"RQ {version}: {chains:,} chains of 5, depends_on / no dependencies",
        f"{fmt_ratio('depends_on/independent', r)}; RQ {rate:,.0f} jobs/s{reference}",
        "reference",
        None,
        {"rq": version, "chained_s": chained, "plain_s": plain},
    )
