"""Straggler hedging and pre-warming: a map that does not wait for its slowest calls.

Every 25th call stalls for 5 s on its first attempt, as on a slow or overloaded replica. With
``hedge=0.9`` a request still unanswered after the 90th percentile of its job's answered
requests gets a backup; the first answer wins and the stalled attempt is cut (the replica kills
the worker running it). ``prewarm=True`` raises the Azure app's minReplicas for the job, so
cold starts overlap with submission (a no-op on the local runtime, whose replicas are always
up). Hedge idempotent functions only: a call may run twice. Runs on the embedded local runtime
with nothing configured:

    python examples/stragglers.py [CALLS]
"""

import asyncio
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

from async_ca_exec import AsyncExecutor

STALL_EVERY = 25


def lookup(i: int, marks: str) -> int:
    """An idempotent call (a lookup, say); every STALL_EVERY-th one stalls on its first attempt."""
    if i % STALL_EVERY == 7:
        try:
            os.close(os.open(Path(marks, str(i)), os.O_CREAT | os.O_EXCL))  # the first attempt only
            time.sleep(5)
        except FileExistsError:
            pass
    time.sleep(0.02)
    return i * i


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as marks:
        async with AsyncExecutor(max_concurrency=8) as ex:
            started = time.perf_counter()
            results = await ex.map(functools.partial(lookup, marks=marks), range(calls), hedge=0.9, prewarm=True)
            wall = time.perf_counter() - started
            assert results == [i * i for i in range(calls)]
            hedges = ex.job_summary()["hedges"]
    stalled = sum(1 for i in range(calls) if i % STALL_EVERY == 7)
    print(f"{calls} results in {wall:.1f} s ({stalled} calls stalled 5 s on their first attempt)")
    print(f"hedges: {hedges['sent']} backups sent, {hedges['won']} answered first")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
