"""The pretraining stage of ``dino-pretrain`` (:mod:`flows.pretrain`), one module per concern:

==========================  ==================================================================================
``preflight.py``            the first two tasks: the request resolved and checked; what needs this worker
``mlflow_run.py``           the MLflow run of one training: opened, resumed by a new flow run, ended with a
                            stop reason (also by the flow's cancellation and crash hooks)
``launchers.py``            the launcher interface and the table of launchers (``launch.launcher``)
``local.py``                ``local``: ``torchrun`` on this worker (the ``train`` task)
``kubernetes/``             ``kubernetes``: an Indexed Job of pods followed with kubectl
                            (``train-on-kubernetes``; the Job template and its renderer)
``trainer_process.py``      ``torchrun`` as a child process, followed and stopped cleanly (no Prefect; also
                            the torchrun feature extraction's)
``progress_artifact.py``    the trainer's progress as a Prefect artifact and log lines, for every launcher
``training_progress.py``    the progress line and the hardware description (no Prefect)
``results.py``              the loss curve, the registered version (``register-backbone``), the summary
``registration.py``         an export registered in MLflow (no Prefect; ``dino register`` uses it too)
``settings.py``             the flow's groups of settings resolved in a flow run (deployment defaults,
                            deprecated flat names)
==========================  ==================================================================================

This file imports nothing: :mod:`tasks.validation` and the ``dino`` command use the Prefect-free modules
(``trainer_process``, ``registration``) before Prefect starts. Import from the modules.
"""
