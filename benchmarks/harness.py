"""What every workload uses: the worker processes, the producer, Redis and store helpers.

One Celery worker node (``-P prefork -c 2``, as most deployments start, on the two cores of
the benchmark machine) runs ``benchmarks/bench_app.py`` against the Redis broker and the
run's own PostgreSQL cluster (``cluster.py``); this process is the producer. Completions
are counted with one Redis ``INCR`` per body, so no result backend is needed unless a
workload asks for one.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import text

from benchmarks.cluster import Cluster
from benchmarks.pgstats import StatementCounts, StatementStats

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("CAUSAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Result:
    id: str
    workload: str
    measured: str
    target: str
    ok: bool | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StatementRow:
    """Statements per task of one workload, next to their budget."""

    id: str
    what: str
    per_task: dict[str, Any]
    budget: float

    @property
    def ok(self) -> bool:
        return bool(self.per_task["statements_per_task"] <= self.budget + 1e-9)


@dataclass(frozen=True)
class WorkerConfig:
    """How the worker node runs; a workload that needs another one restarts it."""

    deduplicate: str = "always"
    #: A Redis result backend and task events (``-E``), as most deployments run.
    realistic: bool = False
    #: ``causal_local_hold`` (None: the library's default); 0 parks every follower that
    #: arrives before its leader finished.
    local_hold: float | None = None


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Bench:
    """The producer's side of a run: its worker node, its Redis keys, its store.

    ``store_url`` is what workers connect with; ``admin_url`` reaches the same tables as a
    superuser, for the benchmark's own set-up and polling. On the run's own cluster
    (:func:`for_cluster`) the store's statements are counted; on another server (the soak
    test, on the tests' server) nothing is counted.
    """

    def __init__(
        self, store_url: str, admin_url: str, run: str, log_dir: Path, *, count: bool = False
    ) -> None:
        self.prefix = f"causal-bench-{run}:"
        settings = {
            "CAUSAL_STORE_URL": store_url,
            "CAUSAL_BENCH_PREFIX": self.prefix,
            "CAUSAL_BENCH_REDIS_URL": REDIS_URL,
        }
        self.env = dict(os.environ, **settings)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ.update(settings)
        from benchmarks import bench_app
        from celery_causal.sql import open_store

        self.mod = bench_app
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.log_dir = log_dir
        self.log_path = log_dir / f"bench-worker-{run}.log"
        #: The store as workers use it (its role's statements are the ones counted).
        self.store = open_store(store_url)
        self.store.create_schema()
        #: The same tables as the superuser: the benchmark's polling, not counted.
        self.admin = open_store(admin_url, create_schema=False)
        self.pg = StatementStats(admin_url) if count else None
        # The app's own store in this process (W5's sweep, W6) connects before anything is
        # measured: its first connection's catalogue queries are set-up, not work.
        from celery_causal.task import runtime_for

        runtime_for(bench_app.app).store.stats()
        self.statements: list[StatementRow] = []
        self.worker: subprocess.Popen[bytes] | None = None
        self.config: WorkerConfig | None = None
        #: follows / plain Celery independent tasks (W7), put next to RQ's own (W8).
        self.ordering_cost: tuple[float, float, float] | None = None
        #: How long to wait for autovacuum's ANALYZE after a bulk insert (0: run one).
        self.settle_wait = 120.0

    @classmethod
    def for_cluster(cls, cluster: Cluster, run: str, log_dir: Path) -> Bench:
        return cls(cluster.store_url, cluster.admin_url, run, log_dir, count=True)

    def measuring(self, counts: StatementCounts) -> AbstractContextManager[None]:
        """Count the store's statements during the block into ``counts``."""
        if self.pg is None:
            raise RuntimeError("statements are counted on the benchmark's own cluster only")
        return self.pg.measuring(counts)

    # -- the worker node ------------------------------------------------------------------

    def use_worker(self, config: WorkerConfig | None) -> None:
        """Run the worker node as ``config`` says (None: no worker)."""
        if config == self.config and (config is None or self.worker is not None):
            return
        self.stop_worker()
        if config is None:
            return
        env = dict(self.env, CAUSAL_DEDUPLICATE=config.deduplicate)
        if config.local_hold is not None:
            env["CAUSAL_LOCAL_HOLD"] = str(config.local_hold)
        argv = [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker"]
        argv += ["-P", "prefork", "-c", "2", "-l", "warning"]
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
        if config.realistic:
            env["CAUSAL_BENCH_RESULTS"] = "1"
            argv.append("-E")
        self.worker = spawn(argv, env, self.log_path)
        self.config = config
        # Warm up: both processes connected to the broker and the database.
        self.run_plain(20)
        self.run_causal(20)

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop_process(self.worker)
        self.worker, self.config = None, None

    def close(self) -> None:
        self.stop_worker()
        for key in self.redis.scan_iter(f"{self.prefix}*", count=1000):
            self.redis.delete(key)
        self.store.close()
        self.admin.close()
        if self.pg is not None:
            self.pg.close()

    def pool_rss(self) -> dict[int, int]:
        assert self.worker is not None
        out = {}
        for child in psutil.Process(self.worker.pid).children():
            with suppress(psutil.NoSuchProcess):
                out[child.pid] = child.memory_info().rss
        return out

    # -- producing and counting -----------------------------------------------------------

    def count(self) -> int:
        return int(self.redis.get(self.mod.COUNTER) or 0)

    def reset(self) -> None:
        self.redis.set(self.mod.COUNTER, 0)

    def wait_count(self, n: int, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {n} tasks (have {self.count()})")
            time.sleep(0.002)
        return time.perf_counter()

    def send(self, task: Any, items: Sequence[tuple[int, str | None, str | None]]) -> None:
        """``(argument, task id, follows)`` for each message, in this order."""
        with self.mod.app.producer_or_acquire() as producer:
            for i, task_id, follows in items:
                options: dict[str, Any] = {"producer": producer}
                if task_id is not None:
                    options["task_id"] = task_id
                if follows is not None:
                    options["follows"] = follows
                task.apply_async((i,), **options)

    def timed(self, n: int, send: Callable[[], None]) -> float:
        """Seconds from the first message sent to the ``n``-th body run."""
        self.reset()
        t0 = time.perf_counter()
        send()
        return self.wait_count(n) - t0

    def run_plain(self, n: int) -> float:
        return self.timed(n, lambda: self.send(self.mod.plain, [(i, None, None) for i in range(n)]))

    def run_causal(self, n: int) -> float:
        return self.timed(
            n, lambda: self.send(self.mod.causal, [(i, None, None) for i in range(n)])
        )

    def run_waves(self, task: Any, chains: int, depth: int, follows: bool) -> float:
        """Chains sent a link at a time: each wave after the previous one ran."""
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

    def run_chains(self, chains: int, depth: int, *, reverse: bool) -> float:
        """Chains of ``follows`` sent up front, each in chain order or fully reversed."""
        run = uuid.uuid4().hex[:8]
        links = range(depth - 1, -1, -1) if reverse else range(depth)
        items = [
            (k, f"{run}-{c}-{k}", f"{run}-{c}-{k - 1}" if k else None)
            for c in range(chains)
            for k in links
        ]
        return self.timed(chains * depth, lambda: self.send(self.mod.causal, items))

    def publish_ceiling(self, n: int) -> float:
        """Plain Celery's own publish rate here: apply_async to a queue nobody consumes."""
        t0 = time.perf_counter()
        with self.mod.app.producer_or_acquire() as producer:
            for i in range(n):
                self.mod.plain.apply_async((i,), queue="bench-ceiling", producer=producer)
        rate = n / (time.perf_counter() - t0)
        self.redis.delete(f"{self.prefix}bench-ceiling")
        return rate

    def settle_table(self, wait: float | None = None) -> str:
        """Let the follower table's statistics catch up after a bulk insert, as autovacuum
        keeps them on a production server: wait up to ``wait`` seconds for its automatic
        ANALYZE, then run one. Returns which of the two it was."""
        fresh = text(
            "SELECT n_mod_since_analyze <= 50 + 0.1 * n_live_tup FROM pg_stat_user_tables "
            "WHERE relname = 'causal_followers'"
        )
        deadline = time.monotonic() + (self.settle_wait if wait is None else wait)
        with self.admin.engine.connect() as conn:
            while time.monotonic() < deadline:
                if conn.execute(fresh).scalar():
                    return "autovacuum"
                time.sleep(1)
            conn.execute(text("ANALYZE causal_followers"))
            conn.commit()
        return "ANALYZE"

    # -- statements -----------------------------------------------------------------------

    def record_statements(
        self, id_: str, what: str, counts: StatementCounts, tasks: int, budget: float
    ) -> dict[str, Any]:
        per_task = counts.per_task(tasks)
        self.statements.append(StatementRow(id_, what, per_task, budget))
        return per_task


def budget(counts: StatementCounts, *, independent: int, followers: int, deduplicate: str) -> float:
    """The statement budget of a stretch, per task: an independent task 1 statement
    (``"redelivered"``) or 2 (``"always"``), a follower that finds its leader done 2, a
    parked follower's whole life (park, claim, delete, run) 5."""
    parked = min(counts.count("park"), followers)
    total = independent * (1 if deduplicate == "redelivered" else 2)
    total += 2 * (followers - parked) + 5 * parked
    return total / (independent + followers)


def ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the pairwise ratios of two alternated series."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def alternate(
    repeats: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    first, second = [], []
    for _ in range(repeats):
        first.append(a())
        second.append(b())
    return first, second


def fmt_ratio(name: str, r: tuple[float, float, float]) -> str:
    return f"{name} = {r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"
