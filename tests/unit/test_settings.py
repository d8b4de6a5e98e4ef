from __future__ import annotations

from datetime import timedelta

import pytest

from celery_causal.errors import ConfigurationError
from celery_causal.settings import DEFAULT_STORE_URL, CausalSettings, mask_url


def test_defaults_are_the_seeds() -> None:
    s = CausalSettings.from_conf({})
    assert (s.lookback, s.seen_ttl, s.max_depth) == (900, 1800, 20)
    assert s.store_url == DEFAULT_STORE_URL
    assert s.sweep_interval == 30 and s.on_leader_failure == "wait"


def test_durations_accept_timedeltas_and_none_disables_depth() -> None:
    s = CausalSettings.from_conf(
        {
            "causal_lookback": timedelta(minutes=2),
            "causal_seen_ttl": 300,
            "causal_max_depth": None,
            "causal_local_hold": timedelta(milliseconds=250),
            "causal_local_lookahead": "0.02",
            "broker_url": "ignored",
        }
    )
    assert (s.lookback, s.seen_ttl, s.max_depth) == (120, 300, None)
    assert (s.local_hold, s.local_lookahead) == (0.25, 0.02)


@pytest.mark.parametrize(
    ("conf", "names"),
    [
        ({"causal_lookback": -5}, "causal_lookback"),
        ({"causal_seen_ttl": 60}, "causal_seen_ttl"),
        ({"causal_max_depth": -1}, "causal_max_depth"),
        ({"causal_store_url": "mysql://u:secret@h/db"}, "causal_store_url"),
        ({"causal_lookbak": 5}, "causal_lookbak"),
        ({"causal_on_leader_failure": "explode"}, "causal_on_leader_failure"),
        ({"causal_deduplicate": "sometimes"}, "causal_deduplicate"),
        ({"causal_local_hold": -1}, "causal_local_hold"),
        ({"causal_local_lookahead": -0.1}, "causal_local_lookahead"),
    ],
)
def test_wrong_values_name_the_setting(conf: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigurationError, match=names) as info:
        CausalSettings.from_conf(conf)
    assert "secret" not in str(info.value)


def test_settings_are_frozen() -> None:
    s = CausalSettings.from_conf({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        s.lookback = 5  # type: ignore[misc]


def test_mask_url_hides_the_password() -> None:
    assert mask_url("postgresql+psycopg://bob:s3cret@db:5432/x") == (
        "postgresql+psycopg://bob:***@db:5432/x"
    )


def test_an_error_across_settings_never_prints_the_store_password() -> None:
    url = "postgresql+psycopg://app:hunter2@db:5432/app"
    with pytest.raises(ConfigurationError) as info:
        CausalSettings.from_conf(
            {"causal_store_url": url, "causal_seen_ttl": 10, "causal_lookback": 60}
        )
    message = str(info.value)
    assert "causal_seen_ttl (10s) must be at least causal_lookback (60s)" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://app:hunter2@db:5432/app",
        "postgresql+asyncpg://app:hunter2@db:5432/app",
        "sqlite+aiosqlite:///causal.sqlite3",
    ],
)
def test_a_driver_the_store_does_not_run_on_is_a_settings_error(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CausalSettings.from_conf({"causal_store_url": url})
    message = str(info.value)
    assert "causal_store_url" in message and "hunter2" not in message
    assert ("postgresql+psycopg://" if url.startswith("postgresql") else "sqlite:///") in message
    assert "\n" not in message


def test_a_store_built_from_a_url_directly_refuses_another_driver_without_connecting() -> None:
    from celery_causal.sql import open_store

    with pytest.raises(ConfigurationError, match=r"postgresql\+psycopg://") as info:
        open_store("postgresql+psycopg2://app:hunter2@db:5432/app")
    assert "hunter2" not in str(info.value)


def test_a_postgresql_url_without_a_driver_runs_on_psycopg_3() -> None:
    from celery_causal.settings import engine_url

    assert engine_url("postgresql://app@db/app").drivername == "postgresql+psycopg"
    assert engine_url("sqlite:///x.sqlite3").drivername == "sqlite"


def test_the_package_says_which_version_is_installed() -> None:
    import importlib.metadata

    import celery_causal

    assert celery_causal.__version__ == importlib.metadata.version("celery-causal")


def test_store_retry_max_delay_must_cover_the_first_delay() -> None:
    with pytest.raises(ConfigurationError, match="causal_store_retry_max_delay"):
        CausalSettings.from_conf({"causal_store_retry_delay": 90})
    s = CausalSettings.from_conf({"causal_store_retry_delay": 0.5})
    assert (s.store_retry_delay, s.store_retry_max_delay) == (0.5, 60)
