"""A pool that changes between decode steps, shared by the host-pool and the RPC-device tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spac_llamacpp.native.expert_pool import FREE, ExpertPool


def churn_hook(pool: ExpertPool, everything: list[tuple[int, int]],
               rng: np.random.Generator) -> Callable[[int], None]:
    """A ``between`` hook: evict two held experts, load others (at most 4 held); copies may still run when
    the next step starts."""
    held: list[tuple[int, int]] = []

    def change(step: int) -> None:
        for _ in range(min(2, len(held))):
            il, e = held.pop(int(rng.integers(len(held))))
            pool.evict(il, e)
        pool.fence()
        free = [s for s in range(pool.n_slots[0]) if pool.slot(0, s)[0] == FREE]
        for il, e in [everything[i] for i in rng.permutation(len(everything))]:
            if not free or len(held) >= 4:
                break
            if pool.slot_of(il, e) < 0:
                pool.load(il, e, free.pop())
                held.append((il, e))

    return change
