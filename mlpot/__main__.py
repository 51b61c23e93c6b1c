"""``python -m mlpot ARGS``, the same as the ``mlpot`` console script."""

import sys

from mlpot.commands import main

sys.exit(main())
