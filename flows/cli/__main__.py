"""``python -m flows.cli``: the ``dino`` console command (:func:`flows.cli.main`)."""

import sys

from flows.cli import main

sys.exit(main())
