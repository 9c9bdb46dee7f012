"""`python -m clients`: the command-line chat client (clients/cli.py)."""

import sys

from .cli import main

sys.exit(main())
