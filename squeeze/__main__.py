"""`python -m squeeze ...` is the `squeeze` command (and what torchrun launches)."""

import sys

from squeeze.cli import main

sys.exit(main())
