"""``python -m relaykernel``: the same CLI as the ``relaykernel`` command."""

import sys

from .cli import main

sys.exit(main())
