"""The multi-node training Job template (``multinode-job.yaml``) and its renderer (:mod:`tasks.kubernetes.render`),
used by ``dino-pretrain`` with ``launcher="kubernetes"`` (:mod:`tasks.kubernetes_job`)."""
