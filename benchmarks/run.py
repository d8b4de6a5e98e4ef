"""``python -m benchmarks``: celery-causal next to plain Celery and RQ, as same-run ratios.

Starts its own PostgreSQL cluster (``cluster.py``), one Celery worker node (``harness.py``)
and, for W8, two RQ workers; this process is the producer. ``--quick`` runs tiny sizes
(CI uses it so the benchmark cannot rot); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import w_peers, w_release, w_scale, w_tasks
from benchmarks.cluster import ClusterUnavailable, throwaway_cluster
from benchmarks.harness import Bench, Result, WorkerConfig
from benchmarks.report import header, print_report

ALL = "W1,W1d,W1r,W2,W3,W4,W5,W6,W7,W8"


def _workloads(quick: bool, repeats: int) -> list[tuple[set[str], Callable[[Bench], Any]]]:
    """Which ids each step reports, and the step, at the issue's sizes (quick: / 50), in
    the order they run."""
    s = 50 if quick else 1
    tasks = w_tasks.independent
    return [
        (
            {"W1"},
            lambda b: tasks(b, 5000 // s, repeats, id_="W1", config=WorkerConfig(), target=1.25),
        ),
        (
            {"W1d"},
            lambda b: tasks(
                b,
                5000 // s,
                repeats,
                id_="W1d",
                config=WorkerConfig(deduplicate="redelivered"),
                target=1.15,
            ),
        ),
        (
            {"W1r"},
            lambda b: tasks(
                b, 5000 // s, repeats, id_="W1r", config=WorkerConfig(realistic=True), target=1.10
            ),
        ),
        ({"W2", "W3"}, lambda b: w_tasks.chains_in_waves(b, 1000 // s, repeats)),
        ({"W7", "W7c"}, lambda b: w_peers.w7(b, 1000 // s, repeats)),
        ({"W4"}, lambda b: w_release.w4(b, 10_000 // s)),
        ({"W5"}, lambda b: w_release.w5(b, 100_000 // s)),
        ({"W8"}, lambda b: w_peers.w8(b, 1000 // s, repeats)),
        # Last: its million rows leave autovacuum work that would share the cores with
        # any workload after it.
        ({"W6"}, lambda b: w_scale.w6(b, 1_000_000 // s, 20 if quick else 200, 2 if quick else 5)),
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--only",
        default=ALL,
        help=f"comma-separated workloads, of {ALL} (W2, W3 and W3p run together, W7 and W7c too)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="alternations (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--soak",
        type=int,
        nargs="?",
        const=100_000,
        metavar="TASKS",
        help="run the soak test instead (default 100,000 tasks)",
    )
    return parser


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the cluster and the workers are cleaned up."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _soak(b: Bench, tasks: int) -> int:
    from benchmarks.soak import soak

    b.use_worker(WorkerConfig())
    report = soak(b, tasks)
    print(report)
    return 0 if report.lost == report.order_violations == report.rows_left == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _stop_on_sigterm()
    # Per-follower log lines of the in-process sweep (W5) would measure the terminal.
    logging.getLogger("celery_causal").setLevel(logging.ERROR)
    only = {w.strip().upper() for w in args.only.split(",")}
    unknown = only - {w.upper() for w in ALL.split(",")}
    if unknown:
        print(f"python -m benchmarks: unknown workloads {sorted(unknown)}", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.time()
    results: list[Result] = []
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(throwaway_cluster())
        except ClusterUnavailable as exc:
            print(f"python -m benchmarks: cannot start its own PostgreSQL: {exc}", file=sys.stderr)
            return 2
        bench = Bench.for_cluster(
            cluster, uuid.uuid4().hex[:8], Path(os.environ.get("TMPDIR", "/tmp"))
        )
        stack.callback(bench.close)
        bench.settle_wait = 0.0 if args.quick else 120.0
        head = header(cluster.version, args.quick)
        if args.soak:
            return _soak(bench, args.soak)
        for ids, step in _workloads(args.quick, repeats):
            if {i.upper() for i in ids} & only:
                out = step(bench)
                out = out if isinstance(out, list) else [out]
                results += out
                print(f"  {', '.join(r.id for r in out)} done", flush=True)
    print_report(head, results, bench.statements, time.time() - started, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
