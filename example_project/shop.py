"""The shop's Celery app and tasks: order created <- payment captured <- order shipped,
and a refund that follows the payment; charges ordered per customer by an ordering key;
a daily report that follows the day's three loads (fan-in).

Run a worker for it with ``celery -A example_project.shop worker``. Configuration comes from
the environment, so the same code runs embedded (no servers) and on PostgreSQL and Redis:

- ``CELERY_BROKER_URL`` (default ``memory://``, in-process) and ``CELERY_RESULT_BACKEND``
- ``CAUSAL_STORE_URL`` (default: the SQLite file ``celery_causal.sqlite3``)
- ``CAUSAL_LOOKBACK`` seconds (default 900), ``CAUSAL_SWEEP_INTERVAL`` (default 30)
- ``BROKER_KEY_PREFIX``: a prefix for every broker key (optional)
"""

from __future__ import annotations

import os
import threading

from celery import Celery, current_task

import celery_causal

app = Celery(
    "shop",
    broker=os.environ.get("CELERY_BROKER_URL", "memory://"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "cache+memory://"),
)
lookback = float(os.environ.get("CAUSAL_LOOKBACK", 900))
# BROKER_KEY_PREFIX namespaces every broker and result key, so several shops (or test
# runs) can share one Redis.
_prefix = os.environ.get("BROKER_KEY_PREFIX")
_namespaced = {"global_keyprefix": _prefix} if _prefix else {}
app.conf.update(
    causal_store_url=os.environ.get("CAUSAL_STORE_URL") or None,
    causal_lookback=lookback,
    causal_seen_ttl=max(2 * lookback, 60),
    causal_sweep_interval=float(os.environ.get("CAUSAL_SWEEP_INTERVAL", 30)),
    broker_transport_options={"polling_interval": 0.05, **_namespaced},
    result_backend_transport_options=_namespaced,
    broker_connection_retry_on_startup=True,
)
celery_causal.install(app)

#: Bodies that ran in this process, in order: (task id, event, order id).
ran: list[tuple[str, str, int]] = []
_ran_lock = threading.Lock()


def _record(event: str, order_id: int) -> str:
    with _ran_lock:
        ran.append((current_task.request.id, event, order_id))
    print(f"    ran       {event:<17} order {order_id}", flush=True)
    return f"{event}:{order_id}"


@celery_causal.causal_task(app, name="shop.create_order", scope="orders")
def create_order(order_id: int) -> str:
    return _record("order_created", order_id)


@celery_causal.causal_task(app, name="shop.capture_payment", scope="orders")
def capture_payment(order_id: int) -> str:
    return _record("payment_captured", order_id)


@celery_causal.causal_task(app, name="shop.ship_order", scope="orders")
def ship_order(order_id: int) -> str:
    return _record("order_shipped", order_id)


@celery_causal.causal_task(app, name="shop.refund", scope="orders")
def refund(order_id: int) -> str:
    return _record("refund_issued", order_id)


#: Charges that ran in this process, in order: (task id, customer id, amount).
charged: list[tuple[str, int, int]] = []


@celery_causal.causal_task(
    app,
    name="shop.charge",
    scope="billing",
    # Every send of a charge is ordered per customer: one at a time, in send order.
    ordering_key=lambda customer_id, amount: f"customer-{customer_id}",
)
def charge(customer_id: int, amount: int) -> str:
    with _ran_lock:
        charged.append((current_task.request.id, customer_id, amount))
    print(f"    charged   customer {customer_id} {amount:>3}", flush=True)
    return f"charged:{customer_id}:{amount}"


#: Reports and loads that ran in this process, in order: (task id, what ran).
reported: list[tuple[str, str]] = []


@celery_causal.causal_task(app, name="shop.load", scope="reports")
def load(source: str, day: str) -> str:
    with _ran_lock:
        reported.append((current_task.request.id, f"load {source}"))
    print(f"    loaded    {source} for {day}", flush=True)
    return f"loaded:{source}:{day}"


@celery_causal.causal_task(app, name="shop.daily_report", scope="reports")
def daily_report(day: str) -> str:
    """Sent with ``follows=[the day's loads]``: runs once all of them succeeded."""
    with _ran_lock:
        reported.append((current_task.request.id, "report"))
    print(f"    reported  {day}", flush=True)
    return f"report:{day}"
