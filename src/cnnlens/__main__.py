"""``python -m cnnlens ...``: the ``cnnlens`` command (the same as ``cnnlens ...`` and ``python -m cnnlens.cli``)."""

import sys

from cnnlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
