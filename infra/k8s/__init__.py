"""Kubernetes templates (work-pool base job template, multi-node training Job) and their renderer."""
