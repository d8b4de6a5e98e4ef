"""Send the out-of-order order stream to a running worker (the compose ``producer``).

    python -m example_project.produce

Prints each task's result as it arrives; the lost follower comes back ``causal_lookback``
after it parked on the worker, when beat's sweep releases it.
"""

from __future__ import annotations

import os
import sys
import uuid

from example_project.stream import STREAM, send


def main() -> int:
    run = uuid.uuid4().hex[:4]
    print(f"sending {len(STREAM)} events out of order (run {run})", flush=True)
    results = send(run, pause=0.2)
    timeout = float(os.environ.get("PRODUCER_TIMEOUT", 120))
    for (order, event), result in zip(STREAM, results, strict=True):
        print(f"  < {event:<17} order {order}: {result.get(timeout=timeout)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
