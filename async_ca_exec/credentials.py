"""The Azure credential used when the caller gives none: ``DefaultAzureCredential``.

When no credential in its chain works, azure-identity logs the whole chain at WARNING, and a
program that configured no logging gets it printed through Python's last-resort handler, before
our one-line error that already carries its first line. A NullHandler on ``azure.identity``
silences only that fallback: a program that configured logging still receives every record
(``acx -d`` shows them).
"""

from __future__ import annotations

import logging
from typing import Any


def default_credential() -> Any:
    """A fresh ``azure.identity.aio.DefaultAzureCredential`` (the caller closes it)."""
    from azure.identity.aio import DefaultAzureCredential

    quiet = logging.getLogger("azure.identity")
    if not any(isinstance(h, logging.NullHandler) for h in quiet.handlers):
        quiet.addHandler(logging.NullHandler())
    return DefaultAzureCredential()
