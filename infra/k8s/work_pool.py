"""Preview the job a Prefect Kubernetes work pool created from ``infra/k8s/base-job-template.json`` submits for
one flow run, filled the way Prefect's worker fills it (for review before ``prefect work-pool create``).

    python -m infra.k8s.work_pool --set image=registry.example/dino:0.1 --set gpus=4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from tasks.pretrain.kubernetes.render import RenderError, fill, key_value_pairs, to_yaml

WORK_POOL_TEMPLATE = Path(__file__).resolve().parent / "base-job-template.json"


def load_work_pool_template(path: str | Path = WORK_POOL_TEMPLATE) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def render_work_pool_job(values: dict[str, Any] | None = None, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The work pool's ``job_configuration`` filled the way Prefect's worker fills it: the variables' defaults,
    overridden by ``values`` (a deployment's or a run's job variables). Unknown variables are an error."""
    template = template or load_work_pool_template()
    props = template["variables"]["properties"]
    values = dict(values or {})
    unknown = set(values) - set(props)
    if unknown:
        raise RenderError(f"unknown work-pool variable(s) {sorted(unknown)}; known: {sorted(props)}")
    filled = {name: copy.deepcopy(spec.get("default")) for name, spec in props.items()}
    filled.update(values)
    if not isinstance(filled.get("gpus"), int) or filled["gpus"] < 0:
        raise RenderError(f"gpus must be an integer >= 0, got {filled.get('gpus')!r}")
    return fill(template["job_configuration"], filled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.k8s.work_pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], help="job variable KEY=VALUE (JSON values parsed)")
    args = p.parse_args(argv)
    try:
        values = {}
        for key, raw in key_value_pairs(args.set, "--set").items():
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        sys.stdout.write(to_yaml([render_work_pool_job(values)["job_manifest"]]))
        return 0
    except RenderError as e:
        print(f"work_pool: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
