"""W1, W1r, W2, W3: causal tasks against plain Celery tasks with the same body.

Each alternates a plain and a causal run ``repeats`` times and reports the median ratio
and its range; the store's statements are counted over the causal runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.harness import (
    Bench,
    Result,
    WorkerConfig,
    alternate,
    budget,
    fmt_ratio,
    ratio,
)
from benchmarks.pgstats import StatementCounts


def _measured(b: Bench, counts: StatementCounts, run: Callable[[], float]) -> Callable[[], float]:
    """``run``, with the store's statements during it added to ``counts``."""

    def measured() -> float:
        with b.measuring(counts):
            return run()

    return measured


def independent(
    b: Bench, n: int, repeats: int, *, id_: str, config: WorkerConfig, target: float
) -> Result:
    """``n`` independent tasks, no ``follows``: causal time / plain time."""
    b.use_worker(config)
    counts = StatementCounts()
    plain, causal = alternate(
        repeats, lambda: b.run_plain(n), _measured(b, counts, lambda: b.run_causal(n))
    )
    r = ratio(causal, plain)
    per_task = b.record_statements(
        id_,
        f"independent, causal_deduplicate={config.deduplicate!r}"
        + (", result backend, -E" if config.realistic else ""),
        counts,
        n * repeats,
        budget(counts, independent=n * repeats, followers=0, deduplicate=config.deduplicate),
    )
    what = f"{n:,} independent tasks"
    if config.realistic:
        what += ", Redis result backend, -E"
    if config.deduplicate != "always":
        what += f", causal_deduplicate={config.deduplicate!r}"
    return Result(
        id_,
        what,
        fmt_ratio("causal/plain", r),
        f"<= {target:.2f}",
        r[0] <= target,
        {
            "plain_s": plain,
            "causal_s": causal,
            "plain_tasks_per_s": n / statistics.median(plain),
            "statements": per_task,
        },
    )


def chains_in_waves(b: Bench, chains: int, repeats: int) -> list[Result]:
    """W2: chains sent a link at a time (every follower finds its leader done); W3: the
    same chains sent up front, fully reversed (the worker holds each follower until its
    leader arrived and finished); W3p: W3 with the worker's holds off, so that every
    follower parks first: what parking costs."""
    config = WorkerConfig()
    b.use_worker(config)
    waves, reversed_counts = StatementCounts(), StatementCounts()
    plain, causal = alternate(
        repeats,
        lambda: b.run_waves(b.mod.plain, chains, 5, follows=False),
        _measured(b, waves, lambda: b.run_waves(b.mod.causal, chains, 5, follows=True)),
    )
    reversed_ = [
        _measured(b, reversed_counts, lambda: b.run_chains(chains, 5, reverse=True))()
        for _ in range(repeats)
    ]
    b.use_worker(WorkerConfig(local_hold=0))
    parking_counts = StatementCounts()
    parking = [
        _measured(b, parking_counts, lambda: b.run_chains(chains, 5, reverse=True))()
        for _ in range(repeats)
    ]
    tasks, heads = chains * 5 * repeats, chains * repeats

    def statements(id_: str, what: str, counts: StatementCounts) -> dict[str, Any]:
        per_task = budget(counts, independent=heads, followers=tasks - heads, deduplicate="always")
        return b.record_statements(id_, what, counts, tasks, per_task)

    w2_stmts = statements("W2", "chains in waves (followers find the leader done)", waves)
    w3_stmts = statements("W3", "chains fully reversed", reversed_counts)
    w3p_stmts = statements(
        "W3p", "chains fully reversed, holds off (followers park)", parking_counts
    )
    w2 = ratio(causal, plain)
    w3 = ratio(reversed_, causal)
    w3p = ratio(parking, causal)
    return [
        Result(
            "W2",
            f"{chains:,} chains of 5, in waves",
            fmt_ratio("causal/plain", w2),
            "<= 1.30",
            w2[0] <= 1.30,
            {"plain_s": plain, "causal_s": causal, "statements": w2_stmts},
        ),
        Result(
            "W3",
            f"{chains:,} chains of 5, fully reversed",
            fmt_ratio("W3/W2 causal", w3),
            "<= 2.2",
            w3[0] <= 2.2,
            {"reversed_s": reversed_, "statements": w3_stmts},
        ),
        Result(
            "W3p",
            f"{chains:,} chains of 5, fully reversed, causal_local_hold=0 (every follower parks)",
            fmt_ratio("W3p/W2 causal", w3p),
            "reference",
            None,
            {"parked_s": parking, "statements": w3p_stmts},
        ),
    ]
