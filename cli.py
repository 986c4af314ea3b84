"""Run the normswap command line from a checkout: ``python cli.py …`` (installed: ``normswap …``)."""

import sys

from normswap.cli import main

if __name__ == "__main__":
    sys.exit(main())
