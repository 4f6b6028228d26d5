"""`python -m nomyo.server` runs `nomyo serve`."""

import sys

from nomyo.server.cli import main

sys.exit(main())
