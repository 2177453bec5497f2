"""The Lithops seed snippet, unchanged but for the import: the synchronous facade.

python examples/lithops_seed.py
"""

import async_ca_exec as acx


def my_function(x):
    return x + 7


fexec = acx.FunctionExecutor()  # same keyword arguments as AsyncExecutor
fexec.call_async(my_function, 3)
print(fexec.get_result())  # 10
fexec.map(my_function, [1, 2, 3])  # Lithops semantics: returns futures
print(fexec.get_result())  # [8, 9, 10]
