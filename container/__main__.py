"""``python -m acx_server``: the command the runtime image's CMD and the local runtime run."""

from __future__ import annotations

import asyncio
import logging
import sys

from .server import serve
from .settings import SettingsError, from_env


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as exc:
        print(f"acx_server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"acx_server: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
