"""``python -m flcluster`` is the ``flcluster`` command."""

import sys

from flcluster.cli import main

sys.exit(main())
