#!/usr/bin/env bash
# Stop the local stack started by infra/stack-up.sh (worker first); fine when nothing runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$root"
exec "$python" -m infra.stack down "$@"
