"""Quickstart: fan a function out over 1,000 inputs and print the results.

With nothing configured this runs on the embedded local runtime: the same server that runs
in an Azure Container App, started on 127.0.0.1, reached over real HTTP with signed requests.

    python examples/quickstart.py
"""

import asyncio
import math

from async_ca_exec import AsyncExecutor


def collatz_steps(n: int) -> int:
    """A little CPU work per call: steps for n to reach 1 in the Collatz sequence."""
    steps = 0
    n += 1
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


async def main() -> None:
    async with AsyncExecutor() as ex:
        results = await ex.map(collatz_steps, range(1000))
        summary = ex.job_summary()
    print(results)
    print(
        f"{len(results)} calls, longest chain {max(results)} steps (n={results.index(max(results)) + 1}); "
        f"{summary['calls']['succeeded']} succeeded in {summary['wall_seconds']:.2f} s, "
        f"median latency {summary['latency_seconds']['p50'] * 1000:.1f} ms"
    )
    assert results[0] == 0 and results[26] == 111 and math.isfinite(sum(results))


if __name__ == "__main__":
    asyncio.run(main())
