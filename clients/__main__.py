"""`python -m clients`: the command-line chat client (clients/cli.py)."""

import sys

from clients.cli import main

sys.exit(main())
