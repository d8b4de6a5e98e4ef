"""Opt-in: ``pytest -m soak`` (or ``python -m benchmarks --soak``); not part of CI."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from benchmarks.run import Bench, fresh_database
from benchmarks.soak import soak


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_soak_random_arrival_loses_nothing_and_keeps_order(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    tasks = int(os.environ.get("CAUSAL_SOAK_TASKS", 100_000))
    run = uuid.uuid4().hex[:8]
    with fresh_database(run) as db_url:
        bench = Bench(db_url, run, tmp_path)
        try:
            bench.start_worker()
            report = soak(bench, tasks)
        finally:
            bench.stop()
    print(report)
    assert (report.lost, report.order_violations, report.rows_left) == (0, 0, 0)
