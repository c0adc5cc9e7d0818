"""`python -m rayhooks ...`: the same command line as the `rayhooks` console script."""

import sys

from rayhooks.cli import main

if __name__ == "__main__":
    sys.exit(main())
