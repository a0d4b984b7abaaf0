"""``python -m clobjob`` runs the command line."""

import sys

from clobjob.cli import main

sys.exit(main())
