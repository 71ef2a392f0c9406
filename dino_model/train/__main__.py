"""``python -m dino_model.train`` / ``torchrun ... -m dino_model.train``: see :mod:`dino_model.train`."""

import sys

from dino_model.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
