from __future__ import annotations

from dataclasses import dataclass

import pytest

from celery_causal.core import (
    Action,
    Arrival,
    decide,
    may_release,
    needs_store,
    release_order,
    rings,
    store_retry_countdown,
)

NOW = 10_000.0


@pytest.mark.parametrize(
    ("arrival", "done", "action", "reason"),
    [
        (Arrival("t"), set(), Action.RUN, "no leader"),
        (Arrival("t"), {"t"}, Action.SKIP_DUPLICATE, "already done"),
        (Arrival("t", follows="L", published_at=NOW), set(), Action.PARK, "leader not done"),
        (Arrival("t", follows="L", published_at=NOW), {"L"}, Action.RUN, "leader done"),
        (
            Arrival("t", follows="L", published_at=NOW),
            {"L", "t"},
            Action.SKIP_DUPLICATE,
            "already done",
        ),
        # However old the message (a broker backlog, a countdown, a store outage), a
        # follower whose leader has not succeeded waits: its wait counts from its park.
        (Arrival("t", follows="L", published_at=0.0), set(), Action.PARK, "leader not done"),
        (Arrival("t", follows="L", released="leader"), set(), Action.RUN, "released"),
        (Arrival("t", follows="L", released="sweep"), set(), Action.RUN, "released"),
        (Arrival("t", follows="t", published_at=NOW), set(), Action.RUN, "follows itself"),
        (Arrival("t", follows="L"), set(), Action.PARK, "leader not done"),
    ],
)
def test_decide(arrival: Arrival, done: set[str], action: Action, reason: str) -> None:
    verdict = decide(arrival, done)
    assert (verdict.action, verdict.reason) == (action, reason)


def test_released_follower_still_skips_when_it_already_ran() -> None:
    arrival = Arrival("t", follows="L", released="leader")
    assert decide(arrival, {"t"}).action is Action.SKIP_DUPLICATE


@pytest.mark.parametrize(
    ("released", "policy", "action"),
    [
        ("", "fail", Action.FAIL),
        ("leader", "fail", Action.FAIL),  # released by its failed leader: fails on arrival
        ("sweep", "fail", Action.FAIL),  # a stuck claim republished: still a failure
        ("operator", "fail", Action.RUN),  # an operator's release is a decision to run it
        ("", "release", Action.RUN),
        ("leader", "release", Action.RUN),
    ],
)
def test_a_recorded_leader_failure_decides_by_policy(
    released: str, policy: str, action: Action
) -> None:
    arrival = Arrival("t", follows="L", released=released)
    assert decide(arrival, set(), {"L"}, policy).action is action


def test_a_follower_released_by_its_failed_leader_fails_even_once_the_record_expired() -> None:
    arrival = Arrival("t", follows="L", released="leader-failed")
    assert decide(arrival, set(), set(), "fail").action is Action.FAIL


def test_a_leader_that_succeeded_after_failing_counts_as_done() -> None:
    assert decide(Arrival("t", follows="L"), {"L"}, {"L"}, "fail").action is Action.RUN


def test_rings_are_found_once_and_what_leads_into_them_is_not_part_of_them() -> None:
    links = {"a": "b", "b": "c", "c": "a", "x": "a", "y": "x", "p": "q", "q": "gone"}
    assert [sorted(r) for r in rings(links)] == [["a", "b", "c"]]
    assert rings({"a": "b", "b": "a", "c": "d", "d": "c"}) == [["a", "b"], ["c", "d"]]
    assert rings({}) == []


@pytest.mark.parametrize(
    ("depth", "max_depth", "allowed"),
    [
        (0, 20, True),
        (19, 20, True),
        (20, 20, False),
        (21, 20, False),
        (500, None, True),
        (0, 0, False),
    ],
)
def test_may_release(depth: int, max_depth: int | None, allowed: bool) -> None:
    assert may_release(depth, max_depth) is allowed


@dataclass(frozen=True)
class F:
    follower_id: str
    occurred_at: float


@pytest.mark.parametrize(
    ("arrival", "always", "redelivered"),
    [
        (Arrival("t"), True, False),  # a fresh task without follows: only "always" asks
        (Arrival("t", redelivered=True), True, True),
        (Arrival("t", follows="L"), True, True),  # its leader check answers both
        (Arrival("t", follows="t"), True, True),
        (Arrival("t", follows="L", released="leader"), True, True),
    ],
)
def test_needs_store(arrival: Arrival, always: bool, redelivered: bool) -> None:
    assert needs_store(arrival, "always") is always
    assert needs_store(arrival, "redelivered") is redelivered


def test_release_order_is_occurred_then_follower_id() -> None:
    items = [F("b", 2.0), F("c", 1.0), F("a", 2.0)]
    assert [f.follower_id for f in release_order(items)] == ["c", "a", "b"]


def test_store_retry_countdown_doubles_from_the_base_up_to_the_cap_with_jitter() -> None:
    lowest = [store_retry_countdown(n, 1.0, 60.0, rand=lambda: 0.0) for n in range(8)]
    highest = [store_retry_countdown(n, 1.0, 60.0, rand=lambda: 0.999999) for n in range(8)]
    assert lowest == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [round(h) for h in highest] == [1, 2, 4, 8, 16, 32, 60, 60]
    # Every countdown lies between half its step and the step, whatever the draw
    for n in range(12):
        step = min(60.0, 2.0**n)
        assert step / 2 <= store_retry_countdown(n, 1.0, 60.0) <= step


def test_store_retry_countdown_stays_finite_after_a_very_long_outage() -> None:
    assert store_retry_countdown(10**9, 1.0, 60.0, rand=lambda: 0.0) == 30
    assert store_retry_countdown(0, 0.0, 0.0) == 0


def fan_in(**fields: object) -> Arrival:
    return Arrival("t", follows="A", more=("B", "C"), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arrival", "done", "action", "leader", "missing"),
    [
        (fan_in(), set(), Action.PARK, "A", ("A", "B", "C")),
        (fan_in(), {"A", "C"}, Action.PARK, "B", ("B",)),
        (fan_in(), {"A", "B", "C"}, Action.RUN, None, ()),
        # A leader that released it counts, whatever the store says of it by now
        (fan_in(released="leader", released_by="A", seen=("A",)), set(), Action.PARK, "B", None),
        (fan_in(seen=("A", "B")), {"C"}, Action.RUN, None, ()),
        # Lost (the sweep) or an operator's decision: it runs
        (fan_in(released="sweep"), set(), Action.RUN, None, ()),
        (fan_in(released="operator"), set(), Action.RUN, None, ()),
        (fan_in(), {"t"}, Action.SKIP_DUPLICATE, None, ()),
    ],
)
def test_a_follower_of_several_leaders_waits_for_the_first_not_done(
    arrival: Arrival,
    done: set[str],
    action: Action,
    leader: str | None,
    missing: tuple[str, ...] | None,
) -> None:
    verdict = decide(arrival, done)
    assert (verdict.action, verdict.leader) == (action, leader)
    if missing is not None:
        assert verdict.missing == missing


def test_duplicate_leaders_count_once_and_itself_not_at_all() -> None:
    arrival = Arrival("t", follows="A", more=("A", "t", "B", "A"))
    assert arrival.leaders == ("A", "B")
    assert decide(arrival, {"A"}).leader == "B"
    assert Arrival("t", follows="t", more=("t",)).leaders == ()


@pytest.mark.parametrize(
    ("policy", "action"), [("fail", Action.FAIL), ("release", Action.RUN), ("wait", Action.RUN)]
)
def test_a_failed_leader_among_several_applies_the_policy_naming_it(
    policy: str, action: Action
) -> None:
    verdict = decide(fan_in(), {"A", "C"}, {"B"}, policy)
    assert verdict.action is action
    if action is Action.FAIL:
        assert verdict.leader == "B"
    # under "release" it still waits for a leader that is neither done nor failed
    assert decide(fan_in(), {"A"}, {"B"}, "release").leader == "C"


def test_a_follower_released_by_a_failed_leader_among_several_fails_naming_it() -> None:
    arrival = fan_in(released="leader-failed", released_by="C")
    verdict = decide(arrival, set(), set(), "fail")
    assert (verdict.action, verdict.leader) == (Action.FAIL, "C")
