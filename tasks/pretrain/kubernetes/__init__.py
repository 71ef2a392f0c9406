"""``launcher="kubernetes"`` of ``dino-pretrain``: the training as an Indexed Job of ``launch.nnodes`` pods.

==========================  ==========================================================================
``launcher.py``             :class:`KubernetesLauncher` and its ``train-on-kubernetes`` task
``job.py``                  the Job submitted and followed with ``kubectl`` (command lines as data)
``render.py``               fills ``multinode-job.yaml`` (Service, ConfigMap, Indexed Job running torchrun)
``multinode-job.yaml``      the template
==========================  ==========================================================================
"""
