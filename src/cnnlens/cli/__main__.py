"""``python -m cnnlens.cli ...``: the ``cnnlens`` command."""

import sys

from cnnlens.cli import main

sys.exit(main())
