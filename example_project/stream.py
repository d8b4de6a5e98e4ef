"""The out-of-order order stream the demo and the compose producer send."""

from __future__ import annotations

import time
from typing import Any

from example_project import shop

#: Which event each event follows (its leader), per order.
LEADS: dict[str, str | None] = {
    "order_created": None,
    "payment_captured": "order_created",
    "order_shipped": "payment_captured",
    "refund_issued": "payment_captured",
}
TASKS = {
    "order_created": shop.create_order,
    "payment_captured": shop.capture_payment,
    "order_shipped": shop.ship_order,
    "refund_issued": shop.refund,
}
#: (order, event) in the order they are SENT: deliberately scrambled, as several producers
#: and retries would deliver them.
STREAM = [
    (1, "order_shipped"),
    (1, "payment_captured"),
    (2, "refund_issued"),
    (1, "order_created"),
    (2, "payment_captured"),
    (3, "order_created"),
    (2, "order_created"),
    (3, "payment_captured"),
    (3, "order_shipped"),
    (2, "order_shipped"),
    (4, "order_shipped"),  # its payment never comes: lost, released by the sweep
]


def task_id(run: str, order: int, event: str) -> str:
    return f"{run}-order{order}-{event}"


def send(run: str, pause: float = 0.0) -> list[Any]:
    """Send the stream with task ids of ``run``; return the AsyncResults in sending order."""
    results = []
    for order, event in STREAM:
        leader = LEADS[event]
        print(
            f"  > sent      {event:<17} order {order}"
            + (f"   (follows {leader})" if leader else ""),
            flush=True,
        )
        results.append(
            TASKS[event].apply_async(
                (order,),
                task_id=task_id(run, order, event),
                follows=task_id(run, order, leader) if leader else None,
            )
        )
        time.sleep(pause)
    return results
