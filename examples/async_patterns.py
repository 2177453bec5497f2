"""The asyncio patterns: submit, imap over a lazy source, errors, timeouts, cancellation.

python examples/async_patterns.py
"""

import asyncio
import time

from async_ca_exec import AsyncExecutor, CallTimeoutError


def work(x: float) -> float:
    time.sleep(x)
    return x


def risky(x: int) -> int:
    if x % 5 == 0:
        raise ValueError(f"{x} is a multiple of five")
    return x


def numbers():
    """A source too big to hold in memory: imap reads it lazily."""
    i = 0
    while True:
        yield i
        i += 1


async def main() -> None:
    async with AsyncExecutor(max_concurrency=32) as ex:
        # One call, awaited like any coroutine.
        print("pow:", await ex.submit(pow, 2, 20))

        # Results as they complete, from an endless input, stopping when we have enough.
        total = 0
        async for value in ex.imap(risky, numbers(), return_exceptions=True, window=64):
            if isinstance(value, ValueError):
                continue
            total += value
            if total > 10_000:
                break  # leaving the loop cancels the calls still in flight
        print("imap total:", total)

        # Errors come back with their own type and the remote traceback attached.
        try:
            await ex.map(risky, [1, 2, 5])
        except ValueError as exc:
            print("caught:", exc, "| remote traceback attached:", exc.__cause__ is not None)

        # A per-call timeout kills the call on its worker; the others finish.
        results = await ex.map(work, [0.1, 10, 0.2], timeout=1, return_exceptions=True)
        print("with a timeout:", [type(r).__name__ if isinstance(r, CallTimeoutError) else r for r in results])

        # Cancelling a map aborts its requests and frees the workers at once.
        task = asyncio.ensure_future(ex.map(work, [30] * 4))
        await asyncio.sleep(0.5)
        task.cancel()
        t = time.monotonic()
        print("after cancel:", await ex.map(work, [0.01] * 4), f"in {time.monotonic() - t:.2f} s")

        # Futures, as_completed, and the stats of each call.
        futures = [ex.submit(work, d) for d in (0.3, 0.1, 0.2)]
        async for fut in ex.as_completed(futures):
            s = fut.stats
            print(f"{fut.call_id}: {fut.result()} on {s['replica']} in {s['finished'] - s['started']:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
