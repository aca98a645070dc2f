"""``python -m bench``: see bench.cli."""

import sys

from bench.cli import main

if __name__ == "__main__":  # spawned publisher/floor processes import this module too
    sys.exit(main())
