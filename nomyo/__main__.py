"""`python -m nomyo`: the `nomyo` command."""
import sys

from nomyo.cli import main

sys.exit(main())
