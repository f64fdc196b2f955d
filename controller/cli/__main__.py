"""``python -m controller.cli``: the ``lull`` command."""

import sys

from controller.cli.main import main

sys.exit(main())
