"""A producer process of the ordering-key test: ``python -m tests.acceptance.key_producer
N COUNT KEYS LOG`` sends COUNT keyed tasks labelled ``pN-<i>``, in that order, each under
one of KEYS keys chosen at random and with a random countdown that shuffles delivery.

Configured from the environment of a spawned worker (its store, broker and prefix)."""

from __future__ import annotations

import os
import random
import sys

from tests.acceptance import causal_app


def main(producer: int, count: int, keys: int, log: str) -> None:
    handle = causal_app.create(
        os.environ["CAUSAL_TEST_PREFIX"],
        store_url=os.environ["CAUSAL_STORE_URL"],
        broker_url=os.environ["CAUSAL_TEST_BROKER_URL"],
    )
    rnd = random.Random(producer)
    for i in range(count):
        key = f"key-{rnd.randrange(keys)}"
        countdown = rnd.choice((0.0, 0.0, rnd.uniform(0.0, 1.5)))
        handle.keyed.apply_async((log, key, f"p{producer}-{i}"), countdown=countdown)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
