"""``python -m terrabeam`` is the ``terrabeam`` command."""

import sys

from terrabeam.cli import main

sys.exit(main())
