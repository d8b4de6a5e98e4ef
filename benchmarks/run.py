"""``python -m benchmarks``: plain Celery against celery-causal, side by side, as ratios.

One worker node (prefork, 2 processes, events off, no result backend) runs the bench app
against a real Redis broker and a fresh PostgreSQL database; this process is the producer.
``--quick`` runs tiny sizes (CI uses it so the benchmark cannot rot); its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "CAUSAL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("CAUSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Result:
    id: str
    workload: str
    measured: str
    target: str
    ok: bool | None
    details: dict[str, Any] = field(default_factory=dict)


@contextmanager
def fresh_database(run: str) -> Iterator[str]:
    name = f"causal_bench_{run}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Bench:
    def __init__(self, db_url: str, run: str, log_dir: Path) -> None:
        self.prefix = f"causal-bench-{run}:"
        self.env = dict(
            os.environ,
            CAUSAL_STORE_URL=db_url,
            CAUSAL_BENCH_PREFIX=self.prefix,
            CAUSAL_BENCH_REDIS_URL=REDIS_URL,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        os.environ.update(
            CAUSAL_STORE_URL=db_url,
            CAUSAL_BENCH_PREFIX=self.prefix,
            CAUSAL_BENCH_REDIS_URL=REDIS_URL,
        )
        from benchmarks import bench_app

        self.mod = bench_app
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.log_path = log_dir / f"bench-worker-{run}.log"
        from celery_causal.sql import open_store

        self.store = open_store(db_url)
        self.worker: subprocess.Popen[bytes] | None = None

    def start_worker(self) -> None:
        with open(self.log_path, "ab") as log:
            self.worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchmarks.bench_app",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "-l",
                    "warning",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Warm up: both processes connected to the broker and the database.
        self.run_plain(20)
        self.run_causal(20)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(60)
        for key in self.redis.scan_iter(f"{self.prefix}*", count=1000):
            self.redis.delete(key)
        self.store.close()

    # -- helpers ----------------------------------------------------------------------

    def count(self) -> int:
        return int(self.redis.get(self.mod.COUNTER) or 0)

    def reset(self) -> None:
        self.redis.set(self.mod.COUNTER, 0)

    def wait_count(self, n: int, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {n} tasks (have {self.count()})")
            time.sleep(0.002)
        return time.perf_counter()

    def send(self, task: Any, items: list[tuple[int, str | None, str | None]]) -> None:
        with self.mod.app.producer_or_acquire() as producer:
            for i, task_id, follows in items:
                options: dict[str, Any] = {"producer": producer}
                if task_id is not None:
                    options["task_id"] = task_id
                if follows is not None:
                    options["follows"] = follows
                task.apply_async((i,), **options)

    def run_plain(self, n: int) -> float:
        self.reset()
        t0 = time.perf_counter()
        self.send(self.mod.plain, [(i, None, None) for i in range(n)])
        return self.wait_count(n) - t0

    def run_causal(self, n: int) -> float:
        self.reset()
        t0 = time.perf_counter()
        self.send(self.mod.causal, [(i, None, None) for i in range(n)])
        return self.wait_count(n) - t0

    def run_waves(self, task: Any, chains: int, depth: int, follows: bool) -> float:
        run = uuid.uuid4().hex[:8]
        self.reset()
        t0 = time.perf_counter()
        for k in range(depth):
            items = [
                (k, f"{run}-{c}-{k}", f"{run}-{c}-{k - 1}" if follows and k else None)
                for c in range(chains)
            ]
            self.send(task, items)
            self.wait_count(chains * (k + 1))
        return time.perf_counter() - t0

    def run_reversed(self, chains: int, depth: int) -> float:
        run = uuid.uuid4().hex[:8]
        self.reset()
        t0 = time.perf_counter()
        items = [
            (k, f"{run}-{c}-{k}", f"{run}-{c}-{k - 1}" if k else None)
            for c in range(chains)
            for k in range(depth - 1, -1, -1)
        ]
        self.send(self.mod.causal, items)
        return self.wait_count(chains * depth) - t0

    def pool_rss(self) -> dict[int, int]:
        assert self.worker is not None
        out = {}
        for child in psutil.Process(self.worker.pid).children():
            with suppress(psutil.NoSuchProcess):
                out[child.pid] = child.memory_info().rss
        return out


def _ratio(causal: list[float], plain: list[float]) -> tuple[float, float, float]:
    ratios = [c / p for c, p in zip(causal, plain, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _alternate(
    repeats: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    first, second = [], []
    for _ in range(repeats):
        first.append(a())
        second.append(b())
    return first, second


def publish_ceiling(b: Bench, n: int) -> float:
    """Plain Celery's own publish rate here: apply_async to a queue nobody consumes."""
    t0 = time.perf_counter()
    with b.mod.app.producer_or_acquire() as producer:
        for i in range(n):
            b.mod.plain.apply_async((i,), queue="bench-ceiling", producer=producer)
    rate = n / (time.perf_counter() - t0)
    b.redis.delete(f"{b.prefix}bench-ceiling")
    return rate


def w1(b: Bench, n: int, repeats: int) -> Result:
    plain, causal = _alternate(repeats, lambda: b.run_plain(n), lambda: b.run_causal(n))
    med, lo, hi = _ratio(causal, plain)
    return Result(
        "W1",
        f"{n:,} independent tasks",
        f"causal/plain = {med:.2f} ({lo:.2f}-{hi:.2f})",
        "<= 1.10",
        med <= 1.10,
        {"plain_s": plain, "causal_s": causal, "plain_tasks_per_s": n / statistics.median(plain)},
    )


def w2_w3(b: Bench, chains: int, repeats: int) -> list[Result]:
    plain, causal = _alternate(
        repeats,
        lambda: b.run_waves(b.mod.plain, chains, 5, follows=False),
        lambda: b.run_waves(b.mod.causal, chains, 5, follows=True),
    )
    reversed_ = [b.run_reversed(chains, 5) for _ in range(repeats)]
    med, lo, hi = _ratio(causal, plain)
    w3 = [r / c for r, c in zip(reversed_, causal, strict=True)]
    return [
        Result(
            "W2",
            f"{chains:,} chains of 5, in order",
            f"causal/plain = {med:.2f} ({lo:.2f}-{hi:.2f})",
            "<= 1.25",
            med <= 1.25,
            {"plain_s": plain, "causal_s": causal},
        ),
        Result(
            "W3",
            f"{chains:,} chains of 5, fully reversed",
            f"W3/W2 causal = {statistics.median(w3):.2f} ({min(w3):.2f}-{max(w3):.2f})",
            "<= 2.0",
            statistics.median(w3) <= 2.0,
            {"reversed_s": reversed_},
        ),
    ]


def w4(b: Bench, followers: int) -> Result:
    leader = f"w4-leader-{uuid.uuid4().hex[:8]}"
    b.send(b.mod.causal, [(i, None, leader) for i in range(followers)])
    deadline = time.monotonic() + 900
    while b.store.count_followers("bench", leader) < followers:
        if time.monotonic() > deadline:
            raise RuntimeError("followers did not park")
        time.sleep(0.05)
    b.reset()
    before = b.pool_rss()
    peak: dict[int, int] = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid, rss in b.pool_rss().items():
                peak[pid] = max(peak.get(pid, 0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    b.send(b.mod.causal, [(0, leader, None)])
    while b.store.stats():  # every follower claimed, published and deleted
        time.sleep(0.005)
    released = time.perf_counter()
    t1 = b.wait_count(followers + 1)
    stop.set()
    sampler.join()
    release_rate = followers / (released - t0)
    done_rate = followers / (t1 - t0)
    ceiling = publish_ceiling(b, min(followers, 5000))
    growth = max((peak[pid] - before.get(pid, peak[pid])) for pid in peak) / 2**20
    return Result(
        "W4",
        f"1 leader, {followers:,} parked followers",
        f"released {release_rate:,.0f}/s ({release_rate / ceiling:.2f} x plain publish "
        f"{ceiling:,.0f}/s); all done {done_rate:,.0f}/s; RSS +{growth:.1f} MB",
        ">= 5,000/s; <= 50 MB",
        release_rate >= 5000 and growth <= 50,
        {
            "release_s": released - t0,
            "done_s": t1 - t0,
            "rss_growth_mb": growth,
            "plain_publish_per_s": ceiling,
        },
    )


def _payload(b: Bench, task_id: str, queue: str) -> bytes:
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


def _settings(b: Bench) -> Any:
    """The bench app's causal settings: rows the benchmark parks or inserts itself get the
    deadline (park time + causal_lookback) a worker of that app would give them."""
    from celery_causal.task import runtime_for

    return runtime_for(b.mod.app).settings


def _insert_lost(b: Bench, n: int, queue: str) -> None:
    """Park ``n`` followers whose leaders never came, as workers store them."""
    # The task id in the stored message is a placeholder the INSERT replaces, so each row
    # is a distinct task (its id in the headers and properties).
    template = _payload(b, "@ID@", queue)
    with b.store.engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO causal_followers (scope, follower_id, leader_id, task_name, "
                "occurred_at, parked_at, lookback, deadline, content_type, content_encoding, "
                "payload, hostname) "
                "SELECT 'bench-lost', 'lost-' || g, 'gone-' || (g % 100), 'bench.causal', g, "
                "extract(epoch from now()) - 100000, :lookback, extract(epoch from now()) "
                "- 100000 + :lookback, 'application/json', 'utf-8', "
                "convert_to(replace(convert_from(:p, 'UTF8'), '@ID@', 'lost-' || g), 'UTF8'), "
                "'' FROM generate_series(1, :n) g"
            ),
            {"p": template, "n": n, "lookback": _settings(b).lookback},
        )
        conn.execute(text("ANALYZE causal_followers"))


def w5(b: Bench, n: int) -> Result:
    from celery_causal.task import runtime_for

    queue = "bench-lost"  # nobody consumes it: the sweep's publishing is what is measured
    _insert_lost(b, n, queue)
    runtime = runtime_for(b.mod.app)
    me = psutil.Process()
    before = me.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    report = runtime.sweep()
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join()
    queued = b.redis.llen(f"{b.prefix}{queue}")
    b.redis.delete(f"{b.prefix}{queue}")
    rate = report.released / elapsed
    growth = (peak - before) / 2**20
    ok = report.released == n == queued and rate >= 10_000 and growth <= 50
    ceiling = publish_ceiling(b, min(n, 5000))
    return Result(
        "W5",
        f"{n:,} lost followers, one sweep",
        f"{rate:,.0f} released/s ({rate / ceiling:.2f} x plain publish {ceiling:,.0f}/s); "
        f"RSS +{growth:.1f} MB; {queued:,} published",
        ">= 10,000/s, flat memory",
        ok,
        {"seconds": elapsed},
    )


def _latency(b: Bench, ops: int) -> tuple[float, float]:
    from celery_causal.store import Follower

    parks, releases = [], []
    settings = _settings(b)
    payload = _payload(b, "w6", "bench-w6")
    run = uuid.uuid4().hex[:8]
    for j in range(ops):
        f = Follower(
            "bench-w6",
            f"{run}-f{j}",
            f"{run}-L{j}",
            "bench.causal",
            time.time(),
            payload,
            "application/json",
            "utf-8",
        )
        t0 = time.perf_counter()
        b.store.park(f, settings.lookback)
        t1 = time.perf_counter()
        b.store.record_done("bench-w6", f.leader_id)
        claimed = b.store.claim_followers("bench-w6", f.leader_id, 500)
        b.store.finish([c.row_id for c in claimed])
        t2 = time.perf_counter()
        parks.append(t1 - t0)
        releases.append(t2 - t1)
    return statistics.median(parks), statistics.median(releases)


def w6(b: Bench, big: int, ops: int) -> Result:
    _insert_background(b, 1000)
    small = _latency(b, ops)
    _insert_background(b, big - 1000)
    large = _latency(b, ops)
    park_ratio, release_ratio = large[0] / small[0], large[1] / small[1]
    worst = max(park_ratio, release_ratio)
    return Result(
        "W6",
        f"park/release latency, {big:,} vs 1,000 rows",
        f"park x{park_ratio:.2f}, release x{release_ratio:.2f} "
        f"({small[0] * 1e3:.2f}/{small[1] * 1e3:.2f} ms at 1k)",
        "<= 1.2x",
        worst <= 1.2,
        {"small": small, "large": large},
    )


def _insert_background(b: Bench, n: int) -> None:
    payload = _payload(b, "background", "bench-w6")
    with b.store.engine.connect() as conn:
        conn.execute(
            text(
                "INSERT INTO causal_followers (scope, follower_id, leader_id, task_name, "
                "occurred_at, parked_at, lookback, deadline, content_type, content_encoding, "
                "payload, hostname) "
                "SELECT 'bench-bg', 'bg-' || md5(random()::text), 'bg-leader-' || (g % 50000), "
                "'bench.causal', g, extract(epoch from now()), :lookback, "
                "extract(epoch from now()) + :lookback, 'application/json', 'utf-8', :p, '' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": n, "p": payload, "lookback": _settings(b).lookback},
        )
        conn.execute(text("ANALYZE causal_followers"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--only",
        default="W1,W2,W3,W4,W5,W6",
        help="comma-separated workloads (W2 and W3 run together)",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--soak",
        type=int,
        nargs="?",
        const=100_000,
        metavar="TASKS",
        help="run the soak test instead (default 100,000 tasks)",
    )
    args = parser.parse_args(argv)
    # Per-follower log lines of the in-process sweep (W5) would measure the terminal.
    logging.getLogger("celery_causal").setLevel(logging.ERROR)
    only = {w.strip().upper() for w in args.only.split(",")}
    scale = 50 if args.quick else 1
    repeats = args.repeats or (1 if args.quick else 3)
    run = uuid.uuid4().hex[:8]
    results: list[Result] = []
    started = time.time()
    with fresh_database(run) as db_url:
        bench = Bench(db_url, run, Path(os.environ.get("TMPDIR", "/tmp")))
        try:
            bench.start_worker()
            if args.soak:
                from benchmarks.soak import soak

                report = soak(bench, args.soak)
                print(report)
                return 0 if report.lost == report.order_violations == report.rows_left == 0 else 1
            if "W1" in only:
                results.append(w1(bench, 5000 // scale, repeats))
            if only & {"W2", "W3"}:
                results += w2_w3(bench, 1000 // scale, repeats)
            if "W4" in only:
                results.append(w4(bench, 10_000 // scale))
            if "W5" in only:
                results.append(w5(bench, 100_000 // scale))
            if "W6" in only:
                results.append(w6(bench, 1_000_000 // scale, 200 // (10 if args.quick else 1)))
        finally:
            bench.stop()
    cpu = os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    print(
        f"\ncelery-causal benchmark, {time.strftime('%Y-%m-%d')}, {cpu} cores, "
        f"{mem:.0f} GiB, causal_deduplicate={os.environ.get('CAUSAL_DEDUPLICATE', 'always')}"
        f"{' (quick: sizes / 50, numbers meaningless)' if args.quick else ''}"
    )
    print("| id | workload | measured | target | met |")
    print("|---|---|---|---|---|")
    for r in results:
        ok = "-" if args.quick else ("yes" if r.ok else "no")
        print(f"| {r.id} | {r.workload} | {r.measured} | {r.target} | {ok} |")
    print(f"({time.time() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
