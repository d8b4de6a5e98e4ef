"""The soak test: many causal tasks in random arrival order through 2 worker processes.

Run by ``python -m benchmarks --soak [N]`` (and by ``pytest -m soak``), not by CI. Reports
lost tasks, order violations, duplicate runs and rows left in the follower table.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class SoakReport:
    tasks: int
    seconds: float
    lost: int
    order_violations: int
    duplicates: int
    rows_left: int

    def __str__(self) -> str:
        return (
            f"soak: {self.tasks:,} causal tasks in {self.seconds:.0f}s; lost = {self.lost}, "
            f"order violations = {self.order_violations}, duplicates = {self.duplicates}, "
            f"follower-table rows left = {self.rows_left}"
        )


def soak(bench: Any, tasks: int = 100_000, depth: int = 5, seed: int = 1) -> SoakReport:
    """Send ``tasks`` causal tasks as chains of ``depth``, shuffled, and check the result."""
    chains = tasks // depth
    run, log = uuid.uuid4().hex[:8], f"soak-{uuid.uuid4().hex[:6]}"
    messages = [(c, k) for c in range(chains) for k in range(depth)]
    random.Random(seed).shuffle(messages)
    started = time.perf_counter()
    with bench.mod.app.producer_or_acquire() as producer:
        for c, k in messages:
            bench.mod.soak_step.apply_async(
                (log, f"{c}:{k}"),
                task_id=f"{run}-{c}-{k}",
                follows=f"{run}-{c}-{k - 1}" if k else None,
                producer=producer,
            )
    key = bench.prefix + log
    deadline, last, last_change = time.monotonic() + 3600, -1, time.monotonic()
    while time.monotonic() < deadline:
        have = bench.redis.llen(key)
        if have >= chains * depth and not bench.store.stats():
            break
        if have != last:
            last, last_change = have, time.monotonic()
        elif time.monotonic() - last_change > 120:  # no progress for two minutes
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    ran = [e.decode() for e in bench.redis.lrange(key, 0, -1)]
    counts = Counter(ran)
    first = {label: i for i, label in reversed(list(enumerate(ran)))}
    violations = sum(
        1
        for c in range(chains)
        for k in range(1, depth)
        if f"{c}:{k}" in first and first.get(f"{c}:{k - 1}", len(ran)) > first[f"{c}:{k}"]
    )
    bench.redis.delete(key)
    return SoakReport(
        tasks=chains * depth,
        seconds=seconds,
        lost=chains * depth - len(counts),
        order_violations=violations,
        duplicates=sum(n - 1 for n in counts.values()),
        rows_left=sum(s.waiting + s.releasing for s in bench.store.stats()),
    )
