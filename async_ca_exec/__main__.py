"""``python -m async_ca_exec`` is the ``acx`` command."""

import sys

from .cli import main

sys.exit(main())
