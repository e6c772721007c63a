"""`python -m prefsteer.cli` runs the `prefsteer` command."""

import sys

from prefsteer.cli import main

sys.exit(main())
