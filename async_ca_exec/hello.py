"""The call `acx hello` runs remotely (standard library only: runtime images lack the client's extras)."""

from __future__ import annotations

import os
import platform
import socket

from . import __version__


def hello(name: str) -> str:
    return (
        f"Hello {name}! This is async_ca_exec {__version__} on Python {platform.python_version()}, "
        f"host {socket.gethostname()}, pid {os.getpid()}"
    )
