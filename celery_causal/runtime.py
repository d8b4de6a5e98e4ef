"""One app's causal machinery: settings, store, seen cache; the steps a causal task takes.

It takes plain values (an arrival, a follower row, ids) and touches Celery only to publish
released followers through the app (``release.py``, ``eager.py``). The wiring
(``task.py``, ``tracing.py``, ``wiring.py``) calls these steps and sends the events.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cachetools import TTLCache

from .core import LEADER_FAILED, Action, Arrival, Verdict, decide, may_release, needs_store
from .eager import apply_released
from .faults import CRASH_AFTER_DONE, crash_point
from .release import ReleaseReport, publish
from .settings import CausalSettings
from .store import CausalStore, ClaimedFollower, Follower, ParkOutcome

logger = logging.getLogger("celery_causal")


@dataclass
class SweepReport:
    released: int = 0
    refused: int = 0
    expired_done: int = 0
    #: Rings of followers that each waited for another of the ring; one of each released.
    cycles: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class CausalRuntime:
    def __init__(
        self,
        app: Any,
        settings: CausalSettings,
        store: CausalStore,
    ) -> None:
        from kombu.serialization import prepare_accept_content

        # Weakly: the registry maps an app to its runtime weakly, and a value that held its
        # key would keep every installed app (and its connections) alive for the process.
        self._app = weakref.ref(app)
        self.settings = settings
        self.store = store
        self.accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
        # Positive answers only: a leader seen done stays done for the TTL, so a stale
        # entry can never hold a follower back; a negative answer is always re-asked.
        self._seen: TTLCache[tuple[str, str], bool] | None = (
            TTLCache(maxsize=settings.seen_cache_size, ttl=settings.seen_ttl)
            if settings.seen_cache_size
            else None
        )
        self._seen_lock = threading.Lock()

    @property
    def app(self) -> Any:
        app = self._app()
        if app is None:
            raise ReferenceError("the Celery app of this causal runtime was freed")
        return app

    # -- seen cache --------------------------------------------------------------------

    def _cached(self, scope: str, task_id: str) -> bool:
        if self._seen is None:
            return False
        with self._seen_lock:
            return self._seen.get((scope, task_id), False)

    def _remember(self, scope: str, task_ids: Any) -> None:
        if self._seen is not None:
            with self._seen_lock:
                for task_id in task_ids:
                    self._seen[(scope, task_id)] = True

    # -- before the body ---------------------------------------------------------------

    def check(self, scope: str, arrival: Arrival) -> tuple[Verdict, float]:
        """Decide run / park / skip for ``arrival``; also return the store's clock."""
        if not needs_store(arrival, self.settings.deduplicate):
            return Verdict(Action.RUN, "no leader"), 0.0
        wanted = [arrival.task_id] + [t for t in arrival.leaders if t not in arrival.seen]
        known = {t for t in wanted if self._cached(scope, t)}
        if arrival.task_id in known:
            return decide(arrival, known), 0.0
        lookup = self.store.lookup(scope, [t for t in wanted if t not in known])
        self._remember(scope, lookup.done)
        verdict = decide(
            arrival,
            known | lookup.done,
            lookup.failed,
            self.settings.on_leader_failure,
            now=lookup.now,
            lookback=self.settings.lookback,
        )
        return verdict, lookup.now

    def park(self, follower: Follower, lookback: float | None = None) -> ParkOutcome:
        """Store ``follower`` to wait for its leader, for ``lookback`` (this app's)."""
        return self.store.park(follower, self.settings.lookback if lookback is None else lookback)

    # -- after the body ----------------------------------------------------------------

    def complete(self, scope: str, task_id: str, depth: int, *, failed: bool = False) -> int:
        """Record ``task_id``'s outcome, then release its followers; return how many.

        A failed task (``failed``) has its failure recorded, so that every follower, parked
        now or arriving later, meets it: its followers are released and, on arrival, fail
        with ``LeaderFailed`` ("fail") or run ("release") through Celery's own tracer.
        """
        # Order matters: the record is committed no later than the claim (store.py).
        # The first batch of followers is claimed with the record (one round trip on
        # PostgreSQL); a killed process leaves that batch claimed, and the sweep publishes
        # it once causal_release_timeout has passed. A republished follower of a failed
        # leader meets the failure record on arrival, so it still fails.
        limit = self.settings.batch_size if self._may_release(depth) else 0
        record = self.store.record_done_and_claim(
            scope,
            task_id,
            limit,
            failed=failed,
            seen_ttl=self.settings.seen_ttl,
            release_timeout=self.settings.release_timeout,
        )
        crash_point(CRASH_AFTER_DONE, "1")
        if not failed:
            self._remember(scope, (task_id,))
        if not record.waited:
            return 0  # no follower parked before the record; later ones see it
        released = 0
        reason = "leader"
        if failed and self.settings.on_leader_failure == "fail":
            reason = LEADER_FAILED
        if record.claimed:
            report = self._publish(record.claimed, reason=reason, depth=depth + 1)
            released = len(report.published)
        if record.complete:
            return released
        return released + self.release_after_done(scope, task_id, depth, reason=reason)

    def _may_release(self, depth: int) -> bool:
        # Eager releases run one after the other from a queue, never nested, and no beat
        # runs a sweep in an eager process: the guard would only strand the chain's rest.
        return self.app.conf.task_always_eager or may_release(depth, self.settings.max_depth)

    def release_after_done(
        self, scope: str, task_id: str, depth: int, *, reason: str = "leader"
    ) -> int:
        """Release the followers of ``task_id``, whose outcome is recorded.

        Also called when a finished task is delivered again: its process may have died
        between the done record and the claim, and the redelivery is then the only thing
        left that releases those followers before the sweep.
        """
        if not self._may_release(depth):
            # The cascade stops here and goes on from the sweep (at depth 0): the followers
            # are due at once, so the next sweep releases them, not a lookback later.
            waiting = self.store.make_due(scope, task_id)
            if waiting:
                logger.warning(
                    "depth exceeded: %d follower(s) of task %s in scope %r are left to the "
                    "next sweep (release depth %d > causal_max_depth %s)",
                    waiting,
                    task_id,
                    scope,
                    depth + 1,
                    self.settings.max_depth,
                )
            return 0
        return self.release_followers(scope, task_id, depth + 1, reason=reason)

    def record_key(self, scope: str, key: str, task_id: str) -> str | None:
        """Record ``task_id`` as the newest task sent under ordering key ``key``; return
        the task it must follow (``None``: the key was free)."""
        return self.store.record_key(scope, key, task_id)

    def free_key(self, scope: str, key: str, task_id: str, *, failed: bool = False) -> bool:
        """Free ``key`` once ``task_id``, its newest task, finished; whether it did.

        A success frees it, so the next send runs at once however long after. A failure
        frees it only under ``causal_on_leader_failure="release"`` (the key goes on): under
        "wait" the key's next task waits for the sweep, under "fail" it fails, as any
        follower of the failed task would.
        """
        if failed and self.settings.on_leader_failure != "release":
            return False
        return self.store.free_key(scope, key, task_id)

    def leader_failed(self, scope: str, task_id: str, depth: int) -> int:
        """Apply ``causal_on_leader_failure`` to the followers of a task that failed for good."""
        policy = self.settings.on_leader_failure
        if policy == "wait":
            return 0  # its followers wait; the sweep releases them once they are lost
        released = self.complete(scope, task_id, depth, failed=True)
        if released:
            logger.warning(
                "task %s (scope %r) failed; released its %d follower(s), which %s "
                "(causal_on_leader_failure=%r)",
                task_id,
                scope,
                released,
                "fail without running" if policy == "fail" else "run",
                policy,
            )
        return released

    def release_followers(
        self, scope: str, leader_id: str, depth: int, *, reason: str = "leader"
    ) -> int:
        released = 0
        while True:
            claimed = self.store.claim_followers(scope, leader_id, self.settings.batch_size)
            report = self._publish(claimed, reason=reason, depth=depth)
            released += len(report.published)
            if len(claimed) < self.settings.batch_size:
                return released

    def release_one(self, scope: str, follower_id: str) -> ClaimedFollower | None:
        """Release one follower now, whatever it waits for (an operator's decision)."""
        claimed = self.store.claim_one(scope, follower_id)
        if claimed is None:
            return None
        report = self._publish([claimed], reason="operator", depth=0)
        return claimed if report.published else None

    def _publish(
        self,
        claimed: list[ClaimedFollower],
        *,
        reason: str,
        depth: int,
    ) -> ReleaseReport:
        if self.app.conf.task_always_eager:
            # No worker will receive a published message: apply it here, as Celery does.
            applied = apply_released(
                self.app, self.store, claimed, reason=reason, depth=depth, accept=self.accept
            )
            return ReleaseReport(published=applied)
        return publish(
            self.app,
            self.store,
            claimed,
            reason=reason,
            depth=depth,
            accept=self.accept,
        )

    # -- the sweep ---------------------------------------------------------------------

    def sweep(self, progress: Callable[[int], None] | None = None) -> SweepReport:
        """Release lost followers, break rings, expire old records, in bounded batches."""
        report = SweepReport()
        self._sweep_lost(report, progress)
        self._sweep_orphans(report)
        self._sweep_rings(report)
        batch = self.settings.batch_size
        while True:
            expired = self.store.expire_done(self.settings.seen_ttl, batch)
            report.expired_done += expired
            if expired < batch:
                return report

    def _sweep_lost(self, report: SweepReport, progress: Callable[[int], None] | None) -> None:
        batch = self.settings.batch_size
        while True:
            claimed = self.store.claim_lost(self.settings.release_timeout, batch)
            for follower in claimed:
                logger.warning(
                    "stuck follower %s (follows %s, scope %r): its releaser died before "
                    "publishing it; publishing it again"
                    if follower.stuck
                    else "lost follower %s (follows %s, scope %r): its leader did not succeed "
                    "within its lookback; releasing it",
                    follower.follower_id,
                    follower.leader_id,
                    follower.scope,
                )
            self._sweep_publish(claimed, "sweep", report)
            if progress is not None:
                progress(len(claimed))
            if len(claimed) < batch:
                return

    def _sweep_orphans(self, report: SweepReport) -> None:
        # Followers of a leader whose process died after its record, before it claimed
        # them all: nothing else would release them before their lookback.
        batch = self.settings.batch_size
        while True:
            orphans = self.store.claim_orphans(batch)
            for follower in orphans:
                logger.warning(
                    "orphaned follower %s (follows %s, scope %r): its leader's outcome is "
                    "recorded but its release did not finish; releasing it",
                    follower.follower_id,
                    follower.leader_id,
                    follower.scope,
                )
            self._sweep_publish(orphans, "sweep", report)
            if len(orphans) < batch:
                return

    def _sweep_rings(self, report: SweepReport) -> None:
        # A ring of followers each waiting for another of the ring is never lost (each
        # leader is parked): the first of each ring is released, and the rest follow it.
        broken = self.store.claim_cycles(self.settings.batch_size)
        for follower in broken:
            logger.warning(
                "cycle: follower %s (follows %s, scope %r) is in a ring of followers that "
                "wait for each other; releasing it, the first of its ring",
                follower.follower_id,
                follower.leader_id,
                follower.scope,
            )
        report.cycles += len(broken)
        self._sweep_publish(broken, "cycle", report)

    def _sweep_publish(
        self, claimed: list[ClaimedFollower], reason: str, report: SweepReport
    ) -> None:
        # Under "fail", a follower of a leader whose failure is recorded (the depth guard
        # left it, its releaser died) is released as its failed leader releases it: it then
        # fails on arrival even if the record has expired by then.
        failing: set[int] = set()
        if self.settings.on_leader_failure == "fail":
            by_scope: dict[str, set[str]] = {}
            for follower in claimed:
                by_scope.setdefault(follower.scope, set()).add(follower.leader_id)
            for scope, leaders in by_scope.items():
                failed = self.store.lookup(scope, sorted(leaders)).failed
                failing |= {f.row_id for f in claimed if f.scope == scope and f.leader_id in failed}
        for batch, stamp in (
            ([f for f in claimed if f.row_id not in failing], reason),
            ([f for f in claimed if f.row_id in failing], LEADER_FAILED),
        ):
            published = self._publish(batch, reason=stamp, depth=0)
            report.released += len(published.published)
            report.refused += len(published.refused)
