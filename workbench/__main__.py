"""Entry point for `python -m workbench`."""

import sys

from .cli import main

sys.exit(main())
