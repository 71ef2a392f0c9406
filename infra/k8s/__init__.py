"""Kubernetes deployment files applied by hand: the Prefect work pool's base job template, the Kubernetes
deployments (``prefect-k8s.yaml``) and the work-pool job preview (``work_pool.py``). The multi-node training Job
that ``dino-pretrain`` renders lives with its renderer in :mod:`tasks.pretrain.kubernetes`."""
