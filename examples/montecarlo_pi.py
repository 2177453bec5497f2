"""Monte Carlo estimate of pi with numpy: many calls each throw random points, a reduce adds them up.

Each call draws POINTS random points in the unit square with numpy and counts those inside the
quarter circle; map_reduce sums the counts remotely and pi is about 4 * inside / total. Runs on
the embedded local runtime with nothing configured (numpy must be installed in this Python; on
Azure, use a runtime that has numpy, e.g. examples/custom_runtime/Dockerfile):

    python examples/montecarlo_pi.py [CALLS [POINTS]]
"""

import asyncio
import functools
import math
import sys

from async_ca_exec import AsyncExecutor


def throw_darts(seed: int, points: int) -> tuple[int, int]:
    """Map: (points inside the quarter circle, points thrown), from an independent random stream."""
    import numpy as np  # imported where it runs: in the runtime

    rng = np.random.default_rng(seed)
    inside = 0
    for start in range(0, points, 1_000_000):  # bounded memory whatever `points` is
        n = min(1_000_000, points - start)
        x, y = rng.random(n), rng.random(n)
        inside += int(np.count_nonzero(x * x + y * y <= 1.0))
    return inside, points


def add_up(partials: list[tuple[int, int]]) -> tuple[int, int]:
    """Reduce: total inside, total thrown."""
    return sum(p[0] for p in partials), sum(p[1] for p in partials)


async def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    points = int(sys.argv[2]) if len(sys.argv) > 2 else 500_000
    async with AsyncExecutor() as ex:
        inside, total = await ex.map_reduce(functools.partial(throw_darts, points=points), range(calls), add_up)
        summary = ex.job_summary()
    estimate = 4 * inside / total
    print(f"pi ~ {estimate:.6f} from {total:,} points in {calls} calls (error {abs(estimate - math.pi):.6f})")
    print(f"{summary['calls']['succeeded']} calls (the reduce included) succeeded in {summary['wall_seconds']:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
