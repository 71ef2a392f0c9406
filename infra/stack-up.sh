#!/usr/bin/env bash
# Start the local stack (SeaweedFS, MLflow, Prefect server, process worker) on 127.0.0.1; idempotent.
# Options and environment variables: see `python -m infra.stack --help` (e.g. --prefect-port, DINO_STACK_DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$root"
exec "$python" -m infra.stack up "$@"
