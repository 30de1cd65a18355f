"""`python -m cbir` runs the command line."""

import sys

from cbir.cli import main

sys.exit(main())
