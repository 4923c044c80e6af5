"""Fault injection: a seeded share of client training replies fails on purpose.

For tests and benchmarks of the server's tolerance. With ``fault-rate = r``
each (client, round) fails with probability r, independently, in one of the
``fault-kinds``:

- ``raise``: the ClientApp raises, so Flower sends an error reply;
- ``nan``: the client trains, then replies with NaN weights (the server's
  screening leaves the reply out);
- ``timeout``: the client sleeps past ``round-timeout``, then raises (the
  server has stopped waiting: the reply is missing).

The draw depends only on the run's seed, the partition and the round, so a
run with faults is as reproducible as one without. The server counts what was
left out in ``metrics.jsonl`` (``clients_failed``, ``clients_timed_out``) and
the run goes on while at least ``min-clients`` replies are usable.
"""

from __future__ import annotations

import random

#: What an injected fault does (``fault-kinds``, comma-separated).
FAULT_KINDS = ("raise", "nan", "timeout")


class InjectedFault(RuntimeError):
    """The failure a client raises on purpose under ``fault-rate``."""


def injected_fault(seed: int, partition_id: int, server_round: int, rate: float,
                   kinds: tuple[str, ...]) -> str:
    """The fault this client injects in this round: one of ``kinds``, or '' for none."""
    if rate <= 0 or not kinds:
        return ""
    rng = random.Random(f"fault:{seed}:{partition_id}:{server_round}")  # str seeds are stable
    return rng.choice(kinds) if rng.random() < rate else ""
