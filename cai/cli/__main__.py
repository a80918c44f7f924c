"""``python -m cai.cli``: the same as the ``cai`` command (used by tests and ``accelerate launch -m cai.cli``)."""

import sys

from cai.cli import main

sys.exit(main())
