"""A worker or beat given a wrong causal setting stops at once with one clear line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.acceptance.conftest import ROOT

EX_CONFIG = 78

BAD_SETTINGS = [
    ({"CAUSAL_LOOKBACK": "20", "CAUSAL_SEEN_TTL": "10"}, "causal_seen_ttl (10s)"),
    ({"CAUSAL_STORE_URL": "mysql://causal:hunter2@db/causal"}, "causal_store_url"),
]


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    """``celery -A tests.acceptance.causal_app <args>``: its exit status and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.acceptance.causal_app", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"{args[0]} kept running with a wrong setting:\n{stderr}")
    return proc.returncode, stderr


@pytest.mark.parametrize(("overrides", "named"), BAD_SETTINGS, ids=["ttl", "url"])
@pytest.mark.parametrize("command", ["worker", "beat"])
def test_a_wrong_setting_stops_start_up_with_one_line(
    acceptance_env: dict[str, str],
    tmp_path: Path,
    command: str,
    overrides: dict[str, str],
    named: str,
) -> None:
    env = dict(
        acceptance_env,
        CAUSAL_TEST_PREFIX=f"{acceptance_env['CAUSAL_TEST_PREFIX']}bad-{uuid.uuid4().hex[:6]}:",
        **overrides,
    )
    args = {
        "worker": ["worker", "-P", "solo", "-l", "info", "--without-mingle", "--without-gossip"],
        "beat": ["beat", "-l", "info", "-s", str(tmp_path / "beat-schedule")],
    }[command]
    status, stderr = run(env, *args)
    assert status == EX_CONFIG, stderr
    (line,) = [line for line in stderr.splitlines() if named in line]
    assert "Error: invalid celery-causal settings: " in line
    assert "Traceback" not in stderr and "hunter2" not in stderr
