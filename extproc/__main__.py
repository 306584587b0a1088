"""`python -m extproc`: the `extproc` command (the picker's workers are started this way)."""

import sys

from extproc.cli import main

sys.exit(main())
