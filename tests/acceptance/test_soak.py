"""Opt-in: ``pytest -m soak`` (or ``python -m benchmarks --soak``); not part of CI."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from benchmarks.harness import Bench, WorkerConfig
from benchmarks.soak import soak
from tests.conftest import fresh_database


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_soak_random_arrival_loses_nothing_and_keeps_order(redis_url: str, tmp_path: Path) -> None:
    tasks = int(os.environ.get("CAUSAL_SOAK_TASKS", 100_000))
    run = uuid.uuid4().hex[:8]
    with fresh_database(f"_soak_{run}") as db_url:
        # The tests' server: the superuser URL is the store's own.
        bench = Bench(db_url, db_url, run, tmp_path)
        try:
            bench.use_worker(WorkerConfig())
            report = soak(bench, tasks)
        finally:
            bench.close()
    print(report)
    assert (report.lost, report.order_violations, report.rows_left) == (0, 0, 0)
