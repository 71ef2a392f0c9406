"""``python -m dino_model.fast_path --config run.yaml [--preset P] [section.field=value ...] [--steps 3]``: is the fast
path right on this machine? (also under ``torchrun --nproc_per_node=G -m dino_model.fast_path ...``)

The check sets a run up exactly as training does, so it is part of the training package
(:mod:`dino_model.train.check_fast_path`, where its options and output are documented). The training loop imports
this package, so this package never imports the loop: the command replaces this process by
``python -m dino_model.train.check_fast_path`` with the same arguments (same process id and environment, so
torchrun's workers and their rendezvous stay as they are).
"""

import os
import sys

if __name__ == "__main__":
    os.execv(sys.executable, [sys.executable, "-m", "dino_model.train.check_fast_path", *sys.argv[1:]])
