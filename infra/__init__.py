"""Deployment and stack files; :mod:`infra.services` starts local servers (SeaweedFS, MLflow) by PID."""
