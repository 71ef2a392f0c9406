"""``launch.launcher="slurm"`` of ``dino-pretrain``: the training as one Slurm batch job of ``launch.nnodes`` nodes
(``slurm`` settings: :class:`tasks.validation.slurm_settings.SlurmSettings`), requeued at its time limit until the
training is done.

==================  ===========================================================================================
``launcher.py``     :class:`SlurmLauncher` and the ``train-on-slurm`` task (retried: a new job that resumes)
``batch_script.py`` the batch script: #SBATCH options, setup lines, srun + torchrun per node, the pre-limit signal
                    and the requeue
``job.py``          submit, follow (scontrol + the job's log), stop on cancellation (SIGTERM first)
``job_log.py``      the job's log read back: rank 0's lines and progress records, every node's last lines
``outcome.py``      the final state (COMPLETED, FAILED, OUT_OF_MEMORY, NODE_FAIL, TIMEOUT, PREEMPTED, CANCELLED)
                    as the task's outcome, with what to do
``commands.py``     the Slurm command lines and ``scontrol show job`` parsing
==================  ===========================================================================================

Imports nothing here: the ``dino`` command reads :mod:`.batch_script` before Prefect starts.
"""
