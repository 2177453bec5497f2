"""acx_server: the runtime that executes async_ca_exec calls inside a replica.

Installed from the repository's ``container/`` directory as the ``acx_server`` package, so
the same code runs in the Container App image and in the embedded local runtime. Start it
with ``python -m acx_server`` (configured by ``ACX_*`` environment variables, see
``settings.py``).
"""
