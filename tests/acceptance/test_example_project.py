"""The example project as a new user meets it: the demo, on both stores, and the compose file."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.acceptance.conftest import ROOT
from tests.conftest import service_missing


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAUSAL_", "CELERY_", "BROKER_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


LOADS = ("orders", "payments", "stock")


def test_demo_on_the_embedded_default_keeps_causal_order(tmp_path: Path) -> None:
    result = _demo(dict(_clean_env(), TMPDIR=str(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # its embedded store went with it
    assert "broker memory://, store sqlite:///" in result.stdout
    assert "deferred  order1-order_shipped waits for order1-payment_captured" in result.stdout
    assert "swept     order4-order_shipped: its leader never came" in result.stdout
    # The charges under an ordering key, the last delivered first, wait for the one before
    assert "deferred  charge-1-30 waits for charge-1-20" in result.stdout
    charged = [line.split()[1:] for line in result.stdout.splitlines() if "charged" in line]
    assert [c for c in charged if c[:2] == ["customer", "1"]] == [
        ["customer", "1", "10"],
        ["customer", "1", "20"],
        ["customer", "1", "30"],
    ]
    # The day's report, sent before the three loads it follows, runs after all three
    assert "deferred  report waits for load-orders" in result.stdout
    lines = result.stdout.splitlines()
    report = lines.index("    reported  2026-11-30")
    assert all(lines.index(f"    loaded    {s} for 2026-11-30") < report for s in LOADS)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("Summary: tasks run 11, deferred ")
    assert "lost and swept 1, order violations: 0" in summary


def test_the_same_demo_runs_on_postgresql_and_redis(
    pg_url: str, redis_url: str, key_prefix: str
) -> None:
    env = dict(
        _clean_env(),
        CAUSAL_STORE_URL=pg_url,
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        BROKER_KEY_PREFIX=f"{key_prefix}demo:",
    )
    result = _demo(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broker redis://" in result.stdout and "store postgresql+psycopg://" in result.stdout
    assert "order violations: 0" in result.stdout


COMPOSE = ROOT / "docker-compose.yml"


def test_compose_file_validates() -> None:
    if shutil.which("docker-compose") is None:
        service_missing("docker-compose (Debian package docker-compose)", FileNotFoundError())
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_run_modules_and_tasks_that_exist() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"postgres", "redis", "worker", "beat", "flower", "producer"} <= set(services)
    for database in ("postgres", "redis"):
        assert "healthcheck" in services[database]
    for name in ("worker", "beat", "flower", "producer"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        command = service["command"]
        if command[0] == "celery":
            module, attribute = command[command.index("-A") + 1], "app"
            assert importlib.import_module(module).__dict__[attribute] is not None
            assert command[command.index("-A") + 2] == name
        else:
            assert command[:2] == ["python", "-m"]
            assert importlib.util.find_spec(command[2]) is not None, command
    shop = importlib.import_module("example_project.shop").app
    stream = importlib.import_module("example_project.stream")
    assert {t.name for t in stream.TASKS.values()} <= set(shop.tasks)
    assert "celery_causal.sweep" in shop.tasks  # what beat sends
    # One image, built once, for every service of the shop
    images = {services[name]["image"] for name in ("worker", "beat", "flower", "producer")}
    assert len(images) == 1, images
    # Flower's API answers without credentials, as the README's example calls it
    assert services["flower"]["environment"]["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert services["flower"]["environment"]["CAUSAL_STORE_URL"].startswith("postgresql")
    dockerfile = Path(services["worker"]["build"]["dockerfile"])
    for line in (ROOT / dockerfile).read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
