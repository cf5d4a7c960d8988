"""``python -m segdist ...`` and ``accelerate launch -m segdist eval ...``: the ``segdist`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
