"""DINO self-supervised pretraining: the one entry point, for one CPU process, one GPU, or many GPUs and nodes.

One process (CPU, or one GPU when available)::

    python -m dino_model.train --config run.yaml [--preset small] [section.field=value ...]

One node with G GPUs, or N nodes (run the same command on every node)::

    torchrun --nproc_per_node=G -m dino_model.train --config run.yaml [overrides]
    torchrun --nproc_per_node=G --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        -m dino_model.train --config run.yaml [overrides]

Several processes on a CPU machine (gloo)::

    torchrun --nproc_per_node=2 -m dino_model.train --config run.yaml train.device=cpu

Examples of overrides: ``data.source=s3://bucket/imagenette-128/train`` (a shard set holding ``manifest.json``,
or an ImageFolder directory), ``checkpoint.uri=s3://bucket/runs/r1``, ``optim.lr=1e-3``, ``train.max_steps=200``,
``logging.loggers=[console,'jsonl:/tmp/m.jsonl']``. See :mod:`dino_model.config` for every field.

What a run does (:func:`train` in ``loop.py`` reads in this order):

1. :func:`setup_run`: join the process group (NCCL on GPU, gloo on CPU); remove what interrupted checkpoint writes
   left under ``checkpoint.uri``; find the latest checkpoint there; build the data loader of its cursor's epoch
   (which tells the steps per epoch); seed and build student, teacher and loss, the optimiser and the per-step
   schedules; restore the checkpoint; check the fast paths on rank 0's first batch (:mod:`dino_model.fast_path`:
   device data path vs CPU workers, fast step vs fp32 eager step; a failure falls back to the reference path,
   every rank following rank 0); then the student in DDP when distributed, compiled and with fused AdamW when the
   step path says so (on CUDA by default); build the loggers, which record the verdicts.
2. :func:`run_epoch`, from the cursor to the end of each epoch: per step, lr / weight decay / teacher momentum /
   teacher temperature from the schedule arrays at the global step, forward and backward, gradient clipping (per
   parameter by default), drop the last layer's gradients during the ``freeze_last_layer`` epochs, optimiser
   step, teacher EMA (:func:`dino_model.step.train_step`); then metrics (at each logged step also the
   training-health monitor's window verdicts, :mod:`dino_model.health`), agreement across ranks on NaN losses and
   stop signals, and checkpoints, each when the :class:`Cadence` says.
3. :func:`finish`: check that the ranks' teachers are identical and export the teacher backbone (safetensors +
   JSON, loadable by timm) to ``export.uri`` (default ``<checkpoint.uri>/export``).

Exit codes of ``python -m dino_model.train``:

* 0   finished (all epochs, or ``train.max_steps`` reached; a checkpoint and the export are written)
* 1   any other error (the traceback is printed)
* 2   invalid configuration (the message names the field)
* 3   non-finite loss (the message names the step; no checkpoint is written after it, earlier ones stay intact)
* 4   a fast path failed its check with ``train.fast_path_check=strict`` (the message gives the figures)
* 5   ``train.health=stop`` and the training-health monitor called a collapse or a stall (:mod:`dino_model.health`):
  a checkpoint is written, the stop reason is ``collapsed:uniform``, ``collapsed:one-hot`` or ``stalled``
* 143 stopped by SIGTERM, SIGINT or SIGHUP: the current step is finished, a checkpoint is written (atomically; a
  second SIGINT abandons it and nothing half-written remains, a repeated SIGTERM does not), then the process
  exits (logged as a warning: a stop on request is no error). Under torchrun, each worker exits 143 and torchrun
  itself reports the failure.

With ``DINO_PARENT_DEATH_SIGNAL=SIGTERM`` in the environment (the pretrain flow's launcher sets it) every process
gets SIGTERM when its parent dies, so a trainer never outlives a killed ``torchrun`` (:mod:`dino_model.parent_death`).

Rank 0 prints progress lines a person reads (``epoch 1/100 · step 312/31200 · 41 img/s · eta 2h10m · loss ...``,
the ``console`` logger) and, with ``logging.progress``, machine-readable lines ``DINO_PROGRESS {json}`` (see
:mod:`dino_model.metrics`) for a parent process such as the pretrain flow.

The package, one file per concern: ``outcomes.py`` (exit codes, the exceptions that end a run, the result),
``controls.py`` (the loop's controls: :class:`Cadence`, :class:`StopSignals`, :class:`NonFiniteWatch`,
``Throughput``, ``Progress``), ``builders.py`` (loader, batch preparer, model and optimiser, the step path, the
resume checks), ``run.py`` (:class:`Run`: the state between steps and what one step of the loop does), ``loop.py``
(:func:`setup_run`, :func:`run_epoch`, :func:`finish`, :func:`train`), ``cli.py`` (the command line) and
``check_fast_path.py`` (``python -m dino_model.fast_path``: a run set up as here, its fast paths checked).
"""

from .builders import build_train_loader
from .cli import main
from .controls import Cadence, StopSignals
from .loop import finish, run_epoch, setup_run, train
from .outcomes import (
    EXIT_COLLAPSED,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_FAST_PATH,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_TERMINATED,
    NonFiniteLoss,
    TrainingCollapsed,
    TrainingTerminated,
    TrainResult,
)
from .run import Run

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    "EXIT_NONFINITE",
    "EXIT_FAST_PATH",
    "EXIT_COLLAPSED",
    "EXIT_TERMINATED",
    "NonFiniteLoss",
    "TrainingCollapsed",
    "TrainingTerminated",
    "TrainResult",
    "Cadence",
    "StopSignals",
    "Run",
    "setup_run",
    "run_epoch",
    "finish",
    "train",
    "build_train_loader",
    "main",
]
