"""Retrying calls whose function raised: Lithops' RetryingFunctionExecutor, with backoff and a
filter on the errors worth another try (beyond Lithops).

python examples/lithops_retries.py
"""

import random

import async_ca_exec as acx


class Flaky(Exception):
    """An error worth another try (a throttled service, say)."""


def fetch(i):
    if random.random() < 0.5:
        raise Flaky(f"item {i}: try again")
    return i * 10


with acx.RetryingFunctionExecutor(acx.FunctionExecutor(), retries=20, backoff=0.05, retry_on=Flaky) as fexec:
    futures = fexec.map(fetch, range(8))
    done, not_done = fexec.wait(futures)
    print([f.result() for f in futures])
    print(f"{sum(f.failure_count for f in futures)} failed attempts were retried")
