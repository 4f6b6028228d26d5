"""`python -m nomyo.server` runs `nomyo serve`."""

import sys

from nomyo.cli.serve import main

sys.exit(main())
