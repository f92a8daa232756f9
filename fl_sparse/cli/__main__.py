"""``python -m fl_sparse.cli`` is ``fl-sparse``."""

import sys

from fl_sparse.cli.main import main

sys.exit(main())
