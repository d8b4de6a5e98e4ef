"""Several worker hosts, each in a network namespace of its own, while one of them fails.

Three hosts (tests/acceptance/netns.py), each a prefork worker reaching PostgreSQL, Redis
and the broker only over its own link, share one store and one queue; beat, in the root
namespace, sends the sweep every second. Reversed chains and fan-outs stream through them
while one host is cut off from PostgreSQL, SIGKILLed with its whole worker tree and
restarted, or stopped (SIGSTOP) for longer than ``causal_release_timeout``. Afterwards
every task has run, every follower's body started after its leader succeeded (the body
reads its leader's state from the result backend), and nothing is left parked or queued.
Duplicate body runs are allowed (at least once) but counted, and reported with the
duplicate deliveries the done records caught.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from celery_causal.sql import SQLStore, open_store
from tests.acceptance import netns
from tests.acceptance.brokers import every_broker, is_amqp, messages_held
from tests.acceptance.conftest import CeleryProcess, Log, WorkerProcess, recorded
from tests.conftest import fresh_database
from tests.helpers import wait_for

HOSTS = 3
RELEASE_TIMEOUT = 2.0
#: Every process's settings: acks_late, so a message whose task a dead host was running
#: comes back (on Redis also one a stopped or cut-off host holds longer than the visibility
#: timeout: it runs elsewhere, and again on that host later); a short release timeout, so
#: followers a stopped or cut-off releaser left claimed are the sweep's (every second)
#: within the test.
SETTINGS = {
    "CAUSAL_TEST_ACKS_LATE": "1",
    "CAUSAL_TEST_VISIBILITY_TIMEOUT": "4",
    "CAUSAL_RELEASE_TIMEOUT": str(RELEASE_TIMEOUT),
    "CAUSAL_SWEEP_INTERVAL": "1",
}
#: The environment variables naming the services, which each host reaches over its link.
STORE, REDIS, BROKER = "CAUSAL_STORE_URL", "CAUSAL_TEST_REDIS_URL", "CAUSAL_TEST_BROKER_URL"
CHAINS, DEPTH, FAN_OUT = 4, 5, 15
WAVE_TASKS = CHAINS * DEPTH + FAN_OUT + 1
WAVES_BEFORE, WAVES_AFTER = 3, 3


class Stream:
    """Waves of reversed chains and fan-outs of causal ``observe`` tasks.

    Each wave sends, last link first, the back half of ``CHAINS`` new chains of ``DEPTH``
    and ``FAN_OUT`` followers of a new leader; then the front halves of the previous
    wave's chains and its fan-out's leader. Every follower arrives before its leader, and
    a wave's leaders come with the next wave: followers parked before a fault are released
    during it or after it. Each body logs "<label>:<its leader's state>".
    """

    def __init__(self, handle: Any, log: Log) -> None:
        self.handle, self.log = handle, log
        self.run = uuid.uuid4().hex[:6]
        #: Each label sent, with its leader's label (None for a first link or a fan-out's
        #: leader).
        self.leaders: dict[str, str | None] = {}
        self._next: list[str] = []
        self._waves = 0

    def _id(self, label: str) -> str:
        return f"{self.run}-{label}"

    def _send(self, label: str) -> None:
        leader = self.leaders[label]
        self.handle.observe.apply_async(
            (self.log.name, label, self._id(leader or "nobody")),
            task_id=self._id(label),
            follows=self._id(leader) if leader else None,
        )

    def wave(self) -> None:
        w, self._waves = self._waves, self._waves + 1
        now: list[str] = []  # the back halves of this wave's chains, last link first
        later: list[str] = []  # their front halves, sent with the next wave
        for c in range(CHAINS):
            chain = [f"w{w}c{c}.{i}" for i in range(DEPTH)]
            self.leaders.update(
                {label: chain[i - 1] if i else None for i, label in enumerate(chain)}
            )
            now += reversed(chain[DEPTH // 2 :])
            later += reversed(chain[: DEPTH // 2])
        leader, fans = f"w{w}f.L", [f"w{w}f.{k}" for k in range(FAN_OUT)]
        self.leaders.update({leader: None, **dict.fromkeys(fans, leader)})
        for label in [*now, *fans, *self._next]:
            self._send(label)
        self._next = [*later, leader]

    def send(self, waves: int, over: float = 0.0) -> None:
        """Send ``waves`` waves, spread over ``over`` seconds (the producer's pace)."""
        for k in range(waves):
            if k and over:
                time.sleep(over / waves)
            self.wave()

    def finish(self) -> None:
        """Send the waves after a fault, then the leaders the last one's followers wait for."""
        self.send(WAVES_AFTER)
        for label in self._next:
            self._send(label)
        self._next = []

    def ran(self) -> list[tuple[str, str]]:
        """(label, leader's state) of each body run, in the order they ran."""
        return [(label, state) for label, _, state in map(_split, self.log.entries())]


def _split(entry: str) -> tuple[str, str, str]:
    return entry.rpartition(":")


def order_violations(stream: Stream, ran: list[tuple[str, str]]) -> list[str]:
    """Body runs of followers that started before their leader succeeded: the leader's
    result was not SUCCESS when the body read it, or the leader's body had not run yet."""
    seen: set[str] = set()
    bad = []
    for label, state in ran:
        leader = stream.leaders[label]
        if leader is not None and (state != "SUCCESS" or leader not in seen):
            bad.append(f"{label} ran when its leader {leader} was {state}")
        seen.add(label)
    return bad


@dataclass
class Cluster:
    """The hosts' workers, beat, and the producer's side in the root namespace."""

    handle: Any
    store: SQLStore
    #: The producer's and beat's environment (services on loopback).
    env: dict[str, str]
    hosts: list[netns.Host]
    log_dir: Path
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    workers: list[WorkerProcess] = field(default_factory=list)
    beat: CeleryProcess | None = None

    @property
    def broker(self) -> str:
        return "rabbitmq" if is_amqp(self.env[BROKER]) else "redis"

    def log(self, name: str) -> Log:
        client = redis.Redis.from_url(self.env[REDIS])
        return Log(client, self.handle.prefix, name)

    def start(self, n: int) -> None:
        """Start host ``n``'s worker (again), its services reached over its link."""
        host = self.hosts[n]
        env = dict(self.env)
        for key in (STORE, REDIS, BROKER):
            env[key] = host.url(self.env[key])
        log = self.log_dir / f"{host.name}-{len(self.workers)}.log"
        worker = WorkerProcess(env, log, f"{host.name}-{self.name}", launcher=host.launcher)
        worker.start()
        if n < len(self.workers):
            self.workers[n] = worker
        else:
            self.workers.append(worker)

    def wait_ready(self, n: int) -> None:
        node = self.workers[n].nodename
        try:
            wait_for(
                lambda: self.handle.app.control.ping([node], timeout=1), 60, f"{node} to answer"
            )
        except AssertionError:
            print(self.workers[n].log_text())
            raise

    def send_signal(self, n: int, signum: signal.Signals) -> None:
        """Send ``signum`` to host ``n``'s whole worker tree (its process group)."""
        worker = self.workers[n]
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signum)

    def deliveries(self) -> dict[str, int]:
        """Per host, the deliveries of ``observe`` its running worker accepted."""
        nodes = [w.nodename for w in self.workers]
        stats = self.handle.app.control.inspect(nodes, timeout=10).stats() or {}
        return {
            host.name: stats.get(node, {}).get("total", {}).get("acc.observe", 0)
            for host, node in zip(self.hosts, nodes, strict=True)
        }

    def messages_held(self) -> int:
        return messages_held(self.env[BROKER], self.handle.prefix, self.handle.routing.default)

    def stop(self) -> None:
        if self.beat is not None:
            self.beat.stop()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGCONT)  # a stopped one would not stop
            worker.stop()


@pytest.fixture
def cluster(
    acceptance_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    from tests.acceptance import causal_app as module

    with ExitStack() as cleanup:
        suffix = uuid.uuid4().hex[:6]
        db_url = cleanup.enter_context(fresh_database(f"_{suffix}"))
        prefix = f"{acceptance_env['CAUSAL_TEST_PREFIX']}{suffix}:"
        env = dict(acceptance_env, CAUSAL_STORE_URL=db_url, CAUSAL_TEST_PREFIX=prefix, **SETTINGS)
        services = [env[key] for key in (STORE, REDIS, BROKER)]
        hosts = cleanup.enter_context(netns.hosts(HOSTS, services))
        for key, value in SETTINGS.items():  # the producer's app sees the same settings
            monkeypatch.setenv(key, value)
        handle = module.create(prefix, store_url=db_url, broker_url=env[BROKER])
        store = open_store(db_url)
        cleanup.callback(store.close)
        c = Cluster(handle, store, env, hosts, tmp_path)
        cleanup.callback(c.stop)
        for n in range(HOSTS):
            c.start(n)
        schedule = str(tmp_path / "beat-schedule")
        c.beat = CeleryProcess(
            env,
            tmp_path / "beat.log",
            ["beat", "-l", "info", "-s", schedule, "--max-interval", "1"],
        )
        c.beat.start()
        for n in range(HOSTS):
            c.wait_ready(n)
        yield c


def streaming(c: Cluster, name: str) -> Stream:
    """A stream under way through every host: its first waves sent, a wave's bodies run."""
    stream = Stream(c.handle, c.log(name))
    stream.send(WAVES_BEFORE)
    wait_for(lambda: len(stream.log.entries()) >= WAVE_TASKS, 60, "a wave's bodies")
    return stream


def stream_through_fault(stream: Stream, waves: int, seconds: float) -> None:
    """While a fault holds for ``seconds``, keep streaming, and see the other hosts carry
    on: a wave's worth of bodies runs meanwhile."""
    until = time.monotonic() + seconds
    before = len(stream.log.entries())
    stream.send(waves, over=seconds)
    wait_for(
        lambda: len(stream.log.entries()) >= before + WAVE_TASKS, 60, "the other hosts' bodies"
    )
    time.sleep(max(0.0, until - time.monotonic()))  # the fault's full length, not a check


@dataclass
class Outcome:
    tasks: int
    lost: list[str]
    violations: list[str]
    #: Label -> body runs, for those that ran more than once.
    duplicates: dict[str, int]
    #: Deliveries the done records caught as duplicates (celery_causal's duplicate_skipped).
    skipped: int
    parks: int
    #: Per host, deliveries its worker accepted (the last worker, for a restarted host).
    deliveries: dict[str, int]

    def summary(self, scenario: str) -> str:
        extra = sum(self.duplicates.values()) - len(self.duplicates)
        hosts = " ".join(f"{h}={n}" for h, n in self.deliveries.items())
        shown = ", ".join(f"{label} x{n}" for label, n in sorted(self.duplicates.items())[:10])
        return (
            f"multi-host {scenario}: {self.tasks} tasks, {len(self.lost)} lost, "
            f"{len(self.violations)} order violations; {extra} duplicate body runs"
            f"{f' ({shown})' if shown else ''}; {self.skipped} duplicate deliveries skipped; "
            f"{self.parks} parks; deliveries per host {hosts}"
        )


def settle(c: Cluster, stream: Stream) -> Outcome:
    """Wait until every body ran and nothing is left parked, claimed, queued or unacked."""
    expected = set(stream.leaders)
    wait_for(
        lambda: expected <= {label for label, _ in stream.ran()}, 180, f"{len(expected)} bodies"
    )
    deliveries = c.deliveries()
    wait_for(lambda: c.store.stats() == [], 60, "no follower left parked or releasing")
    assert c.beat is not None
    c.beat.stop()  # its sweeps would keep the queue busy
    wait_for(lambda: c.messages_held() == 0, 60, "no message left queued or unacked")
    ran = stream.ran()
    runs = Counter(label for label, _ in ran)
    redis_url, prefix = c.env[REDIS], c.handle.prefix
    return Outcome(
        tasks=len(expected),
        lost=sorted(expected - set(runs)),
        violations=order_violations(stream, ran),
        duplicates={label: n for label, n in runs.items() if n > 1},
        skipped=len(recorded(redis_url, prefix, "skipped")),
        parks=len(recorded(redis_url, prefix, "parked")),
        deliveries=deliveries,
    )


#: check(cluster, outcome, scenario, **more counts to record)
Check = Callable[..., None]


@pytest.fixture
def check(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> Check:
    """Report a run's counts, then hold them to account. The counts go to the terminal and
    to the test's report (its user properties, which JUnit XML and other reporters show;
    the record_property fixture would warn under the default junit_family)."""

    def check_outcome(c: Cluster, outcome: Outcome, scenario: str, **more: int) -> None:
        with capsys.disabled():
            print(f"\n{outcome.summary(f'{scenario} on {c.broker}')}")
        counts = {
            "tasks": outcome.tasks,
            "duplicate_body_runs": sum(outcome.duplicates.values()) - len(outcome.duplicates),
            "duplicate_deliveries_skipped": outcome.skipped,
            "parks": outcome.parks,
            **more,
        }
        request.node.user_properties += [
            *counts.items(),
            ("deliveries_per_host", outcome.deliveries),
        ]
        assert outcome.lost == []
        assert outcome.violations == []
        assert all(outcome.deliveries.values()), f"a host took no part: {outcome.deliveries}"

    return check_outcome


@every_broker
@pytest.mark.timeout(300)
def test_host_cut_off_from_postgresql_for_10s_loses_nothing_and_keeps_order(
    cluster: Cluster, check: Check
) -> None:
    c, victim = cluster, cluster.hosts[1]
    # Given reversed chains and fan-outs streaming through three hosts
    stream = streaming(c, "partition")
    # When host 2 loses PostgreSQL (its packets to it dropped) for 10 s as the stream goes
    # on, then gets it back; its broker and Redis links stay up
    victim.partition(c.env[STORE])
    try:
        stream_through_fault(stream, waves=10, seconds=10.0)
        dropped = victim.dropped()
    finally:
        victim.heal()
    stream.finish()
    # Then every task ran, each follower after its leader succeeded; nothing is left
    scenario = f"partition ({dropped} packets to PostgreSQL dropped)"
    check(c, settle(c, stream), scenario, packets_dropped=dropped)
    assert dropped > 0, "the partition dropped no packet: host 2 was never cut off"


# On RabbitMQ: a broker connection that ends gives the consumer's unacked messages back.
# kombu's Redis transport pops a message (BRPOP) before it records it as unacked, and a
# consumer killed in between loses it: a loss of the transport's, not of this package's.
@pytest.mark.brokers("rabbitmq")
@pytest.mark.timeout(300)
def test_host_whose_worker_tree_is_sigkilled_and_restarted_loses_nothing_and_keeps_order(
    cluster: Cluster, check: Check
) -> None:
    c, victim = cluster, cluster.hosts[1]
    # Given reversed chains and fan-outs streaming through three hosts
    stream = streaming(c, "kill")
    # When host 2's worker, main process and pool, is SIGKILLed mid-stream
    c.workers[1].kill()
    wait_for(lambda: victim.pids() == [], 30, "no process left on host 2")
    # and the stream goes on without it for a while, then it starts again
    stream_through_fault(stream, waves=4, seconds=4.0)
    c.start(1)
    c.wait_ready(1)
    stream.finish()
    # Then every task ran, each follower after its leader succeeded; nothing is left
    check(c, settle(c, stream), "sigkill")


@every_broker
@pytest.mark.timeout(300)
def test_host_stopped_longer_than_the_release_timeout_loses_nothing_and_keeps_order(
    cluster: Cluster, check: Check
) -> None:
    c, victim = cluster, cluster.hosts[1]
    # Given reversed chains and fan-outs streaming through three hosts
    stream = streaming(c, "pause")
    # When host 2's whole worker tree is stopped (SIGSTOP) for three release timeouts as
    # the stream goes on: followers it had claimed for release and not yet published are
    # the sweep's meanwhile, and it publishes its copies too once it runs again
    c.send_signal(1, signal.SIGSTOP)
    try:
        wait_for(
            lambda: all(
                psutil.Process(pid).status() == psutil.STATUS_STOPPED for pid in victim.pids()
            ),
            30,
            "every process on host 2 stopped",
        )
        stream_through_fault(stream, waves=6, seconds=3 * RELEASE_TIMEOUT)
    finally:
        c.send_signal(1, signal.SIGCONT)
    stream.finish()
    # Then every task ran, each follower after its leader succeeded; nothing is left
    check(c, settle(c, stream), "sigstop")
