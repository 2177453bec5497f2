"""Lithops' module functions over futures of two executors: lithops.wait / lithops.get_result
become acx.wait / acx.get_result, LocalhostExecutor stays LocalhostExecutor.

python examples/lithops_wait.py
"""

import time

import async_ca_exec as acx


def slow_square(x):
    time.sleep(0.1 * x)
    return x * x


with acx.LocalhostExecutor() as left, acx.FunctionExecutor() as right:
    futures = left.map(slow_square, [1, 2, 3]) + right.map(slow_square, [4, 5])
    done, not_done = acx.wait(futures, return_when=acx.ANY_COMPLETED)
    print(f"first finished: {done[0].result()}")
    print(acx.get_result(futures))  # [1, 4, 9, 16, 25], in the order given
