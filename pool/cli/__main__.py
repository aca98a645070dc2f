"""``python -m pool.cli``: the ``ctlpool`` command."""

import sys

from . import main

sys.exit(main())
