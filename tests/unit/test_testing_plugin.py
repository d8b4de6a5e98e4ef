"""The testing story users read in the README runs as written, through pytest's plugins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_example() -> str:
    text = README.read_text()
    block = re.search(r"<!-- testing-example -->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "README lost its testing example"
    return block.group(1)


def test_the_readme_testing_example_passes_as_a_users_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_users_tasks=_readme_example())
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_fixtures_give_an_app_whose_follower_waits_for_its_leader(
    pytester: pytest.Pytester,
) -> None:
    # The worker fixture, with tasks defined in a fixture it depends on; and a follower
    # whose leader never comes stays parked (it must not run).
    pytester.makepyfile(
        test_fixtures="""
        import time
        import pytest
        import celery_causal
        from celery_causal.testing import parked

        ran = []

        @pytest.fixture
        def tasks(causal_celery_app):
            @celery_causal.causal_task(causal_celery_app, scope="s")
            def step(label):
                ran.append(label)
            return step

        def test_order(tasks, causal_celery_worker, causal_memory_store):
            lonely = tasks.apply_async(("lonely",), follows="never-sent")
            second = tasks.apply_async(("second",), follows="first")
            while len(parked(tasks.app)) < 2:
                time.sleep(0.05)
            tasks.apply_async(("first",), task_id="first").get(timeout=10)
            second.get(timeout=10)
            assert ran == ["first", "second"]
            assert [f.follower_id for f in parked(tasks.app)] == [lonely.id]
            assert causal_memory_store.count_followers("s", "never-sent") == 1
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
