"""The model card: each registered version's description, and the registered model's, written by the pipeline.

``dino-pretrain`` writes a version's card when it registers the version; every ``dino-evaluate`` rewrites it with
the new scores (and the registered model's description with the current aliases). Everything on the card is read
back from MLflow — the version's tags, its training run, its evaluation runs — so any run of
:func:`update_model_card` rebuilds it, whatever wrote the scores::

    update_model_card.fn("dino-backbone", 3)      # outside a flow: the task's function

A version's card (markdown, rendered by the MLflow UI on the version page):

* a first line of plain text, which the registered model's version list shows: architecture, training set, the
  headline scores;
* **Training**: data set (name, samples, hash, URI), architecture, epochs and steps done with the stop reason
  (run tags ``stop_reason``, ``steps_done``, ``steps_total``, ``epochs_done`` when the run has them, else what
  its metric history and config say), wall time, hardware (run tag ``hardware``), the MLflow run;
* **Fast path**: the verdicts in tags ``fast_path.<check>`` (version or training run), when there are any;
* **Scores**, one table per evaluation set (in percent, 2 decimals, k-NN 20 top-1 first, then the other k,
  linear probes, attention Jaccard, DAVIS J&F), with the set's hash, when and by which run it was evaluated,
  and a link to the evaluation report. Sets recorded before sets had names (tags ``eval.<set hash>.<metric>``)
  are shown under their hash.
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from prefect import task
from prefect.cache_policies import NO_CACHE

from dino_model.eval.score_names import display, headline, is_fraction_metric, label, ordered, sort_key

from .tracking import mlflow_ui_link
from .pretrain.training_progress import format_duration

#: Run tag of an evaluation run naming its HTML report artifact (written by ``tasks.evaluation.report``).
REPORT_TAG = "report.artifact"
#: Run tag of a training run describing the machines it ran on (written from the trainer's start record).
HARDWARE_TAG = "hardware"
#: Run tags of the training-health verdict in force and its latest window (dino_model.mlflow_logger.on_health).
HEALTH_TAG, HEALTH_DETAIL_TAG = "health", "health.detail"
#: Metric names of the learning curve (dino_model.train.knn_monitor: monitor.knn20_top1).
LEARNING_CURVE_PREFIX = "monitor.knn"
#: What the aliases the pipeline manages mean (the registered model's description lists them).
ALIASES = {
    "champion": "the best evaluated version: `dino-evaluate` moves it by its champion policy (default: when "
                "k-NN 20 top-1 beats the champion's on the same evaluation set)",
    "candidate": "the newest trained version: `dino-pretrain` points it at each version it registers",
}
_SET_TAG = re.compile(r"eval\.(?P<set>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<metric>[A-Za-z0-9_-]+)")
_HASH = re.compile(r"[0-9a-f]{12}")
_NOT_SCORES = {"set_hash", "run_id", "set"}


# --------------------------------------------------------------------------------------------------------------
# reading what MLflow holds
# --------------------------------------------------------------------------------------------------------------


def evaluation_sets(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The evaluation sets a version's tags hold scores for: ``[{"name", "hash", "run_id", "scores", "legacy"}]``,
    named sets first (the k-NN / probe sets before the video sets), then sets of the earlier hash-only layout
    (scores converted to percent) that no named set has replaced."""
    sets: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        m = _SET_TAG.fullmatch(key)
        if not m:
            continue
        entry = sets.setdefault(m.group("set"), {"name": m.group("set"), "hash": None, "run_id": None, "scores": {}})
        metric = m.group("metric")
        if metric == "set_hash":
            entry["hash"] = value
        elif metric == "run_id":
            entry["run_id"] = value
        elif metric not in _NOT_SCORES:
            try:
                entry["scores"][metric] = float(value)
            except ValueError:
                continue
    named_hashes = {e["hash"] for e in sets.values() if e["hash"]}
    out = []
    for name in sorted(sets):
        entry = sets[name]
        if not entry["scores"]:
            continue
        legacy = entry["hash"] is None and bool(_HASH.fullmatch(name))
        if legacy and name in named_hashes:
            continue  # the same set, evaluated again under its name: that evaluation is the one shown
        if legacy:
            entry["hash"] = name
            entry["scores"] = {k: 100.0 * v if is_fraction_metric(k) else v for k, v in entry["scores"].items()}
        entry["legacy"] = legacy
        out.append(entry)
    return sorted(out, key=lambda e: (e["legacy"], min(sort_key(m) for m in e["scores"]), e["name"]))


def _run_or_facts(client, run_id: str | None):
    """``(run, None)``, or ``(None, facts)`` when there is no run to read: ``{}`` without an id,
    ``{"missing_run": id}`` when the tracking server has no such run."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None, {}
    try:
        return client.get_run(run_id), None
    except MlflowException:
        return None, {"missing_run": run_id}


def _training_facts(client, run_id: str | None) -> dict[str, Any]:
    """What the card says about training, from the training run (empty when there is none)."""
    run, missing = _run_or_facts(client, run_id)
    if run is None:
        return missing
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    facts: dict[str, Any] = {"run_id": run_id, "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
                             "status": run.info.status, "tags": tags, "params": params, "metrics": metrics}
    end = run.info.end_time or int(time.time() * 1000)
    if run.info.start_time:
        facts["wall_seconds"] = max(0.0, (end - run.info.start_time) / 1000.0)
    if "steps_done" not in tags:
        history = client.get_metric_history(run_id, "loss")
        if history:
            facts["last_logged_step"] = max(m.step for m in history)
    curve = sorted(((m.step, m.value) for key in metrics if key.startswith(LEARNING_CURVE_PREFIX)
                    for m in client.get_metric_history(run_id, key)), key=lambda p: p[0])
    if curve:
        facts["learning_curve"] = {"metric": next(k for k in metrics if k.startswith(LEARNING_CURVE_PREFIX)),
                                   "points": curve}
    return facts


def _evaluation_facts(client, run_id: str | None) -> dict[str, Any]:
    """What the card says about one evaluation, from its run: name, start, tags and the data sets it logged."""
    run, missing = _run_or_facts(client, run_id)
    if run is None:
        return missing
    inputs = []
    for d in (run.inputs.dataset_inputs if run.inputs else []) or []:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "")
        inputs.append({"name": d.dataset.name, "digest": d.dataset.digest, "context": context})
    return {"run_id": run_id, "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
            "start_time": run.info.start_time, "tags": run.data.tags, "inputs": inputs}


# --------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if math.isfinite(v) else None


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _link(text: str, path: str) -> str:
    url = mlflow_ui_link(path)
    return f"[{text}]({url})" if url else text


def training_set_name(training: dict[str, Any], version_tags: dict[str, str]) -> str | None:
    """The training set's name: run tag ``dataset_name``, else derived from its URI like an evaluation set's."""
    tags, params = training.get("tags") or {}, training.get("params") or {}
    if tags.get("dataset_name"):
        return tags["dataset_name"]
    uri = tags.get("data") or version_tags.get("data") or params.get("data.source")
    if not uri:
        return None
    from .evaluation.preflight import default_set_name

    return default_set_name(uri, "")


def training_rows(training: dict[str, Any], version_tags: dict[str, str]) -> list[tuple[str, str]]:
    """The (field, value) rows of the card's Training table."""
    if not training:
        return [("training run", "none recorded (registered from outside dino-pretrain)")]
    if "missing_run" in training:
        return [("training run", f"`{training['missing_run']}` (no longer in MLflow)")]
    tags, params, metrics = training["tags"], training["params"], training["metrics"]
    rows = []
    uri = tags.get("data") or version_tags.get("data") or params.get("data.source", "")
    dhash = tags.get("dataset_hash") or version_tags.get("dataset_hash")
    name = training_set_name(training, version_tags)
    parts = [f"**{name}**" if name else "not recorded"]
    samples = _int(tags.get("dataset_samples"))
    if samples is not None:
        parts.append(f"{samples:,} samples")
    if dhash and dhash != "imagefolder":
        parts.append(f"hash `{dhash[:12]}`")
    if uri:
        parts.append(f"`{uri}`")
    rows.append(("data set", " · ".join(parts)))

    arch = params.get("model.arch") or tags.get("architecture") or version_tags.get("architecture") or "not recorded"
    patch = params.get("model.patch_size")
    arch_text = f"{arch}, patch {patch}" if patch and patch != "None" else str(arch)
    if params.get("model.out_dim"):
        arch_text += f" (DINO head out_dim {params['model.out_dim']})"
    rows.append(("architecture", arch_text))

    epochs_total = _int(params.get("train.epochs"))
    # fractional for a run stopped mid-epoch: the tag's own text (e.g. "0.4054"), never truncated
    epochs_done = tags.get("epochs_done") if _int(tags.get("epochs_done")) is not None else None
    steps_done = _int(tags.get("steps_done"))
    steps_total = _int(tags.get("steps_total"))
    progress = []
    if epochs_done is not None:
        progress.append(f"{epochs_done} of {epochs_total} epochs" if epochs_total else f"{epochs_done} epochs")
    elif epochs_total is not None:
        last_epoch = _int(metrics.get("epoch"))
        progress.append(f"{epochs_total} epochs configured"
                        + (f", last step logged in epoch {last_epoch + 1}" if last_epoch is not None else ""))
    if steps_done is not None:
        progress.append(f"{steps_done:,} of {steps_total:,} steps" if steps_total else f"{steps_done:,} steps")
    elif training.get("last_logged_step") is not None:
        progress.append(f"{training['last_logged_step']:,} steps (last logged)")
    if tags.get("stop_reason"):
        progress.append(f"stop reason: {tags['stop_reason']}")
    elif training.get("status") not in (None, "FINISHED"):
        progress.append(f"run {training['status'].lower()}")
    rows.append(("training", " · ".join(progress) or "not recorded"))
    if training.get("wall_seconds") is not None:
        suffix = "" if training.get("status") == "FINISHED" else " (run not finished)"
        rows.append(("wall time", format_duration(training["wall_seconds"]) + suffix))
    rows.append(("hardware", tags.get(HARDWARE_TAG) or "not recorded"))
    if metrics.get("loss") is not None:
        rows.append(("final loss", f"{metrics['loss']:.4f}"))
    rows += health_rows(training)
    run_text = f"{training.get('run_name') or training['run_id']} (`{training['run_id']}`)"
    rows.append(("MLflow run", _link(run_text, f"experiments/{training['experiment_id']}/runs/{training['run_id']}")))
    if tags.get("git_commit"):
        rows.append(("code", f"git `{tags['git_commit'][:12]}`"))
    return rows


def health_rows(training: dict[str, Any]) -> list[tuple[str, str]]:
    """The training-health verdict (docs/training-health.md) and the learning curve, when the run has them."""
    rows = []
    tags = training.get("tags", {})
    if tags.get(HEALTH_TAG):
        verdict = tags[HEALTH_TAG]
        detail = tags.get(HEALTH_DETAIL_TAG, "")
        rows.append(("training health", f"**{verdict}**" + (f" — {_escape(detail)}" if detail else "")))
    curve = training.get("learning_curve")
    if curve:
        points = curve["points"]
        name = curve["metric"].removeprefix("monitor.").replace("_top1", " top-1")
        shown = points if len(points) <= 8 else points[:3] + points[-4:]
        text = " → ".join(f"{v:.1f} % (step {s:,})" for s, v in shown)
        if len(points) > 8:
            text = text.replace(f"(step {shown[2][0]:,}) → ", f"(step {shown[2][0]:,}) → … → ", 1)
        first, last = points[0], points[-1]
        note = (f"; {last[1] - first[1]:+.1f} points over the randomly initialised backbone (step 0)"
                if first[0] == 0 and len(points) > 1 else "")
        rows.append(("learning curve", f"k-NN {name.removeprefix('knn')}: {text}{note}"))
    return rows


def _escape(text: str) -> str:
    """Text safe in a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def fast_path_rows(version_tags: dict[str, str], training: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """One (check, verdict, path taken, figures) row per check, from the ``fast_path.<check>[.<field>]`` tags of
    the version and its training run (the version's win): ``.path`` is the path, ``.seconds`` the check's time
    (left out when 0: the check did not run), every other field a figure."""
    found = {k: v for k, v in (training.get("tags") or {}).items() if k.startswith("fast_path.")}
    found.update({k: v for k, v in version_tags.items() if k.startswith("fast_path.")})
    checks: dict[str, dict[str, str]] = {}
    for key, value in sorted(found.items()):
        check, _, field = key[len("fast_path."):].partition(".")
        checks.setdefault(check, {})[field or "verdict"] = value
    rows = []
    for check, fields in checks.items():
        verdict, path, seconds = fields.pop("verdict", ""), fields.pop("path", ""), fields.pop("seconds", "")
        figures = [f"{k} {v}" for k, v in fields.items()] + [_seconds(seconds)]
        rows.append((check, verdict, path, ", ".join(f for f in figures if f)))
    return rows


def _seconds(text: str) -> str:
    """``"2.1 s"`` for a positive number of seconds; ``""`` for 0 (the check did not run) or no number."""
    try:
        value = float(text)
    except ValueError:
        return ""
    return f"{value:.1f} s" if value > 0 else ""


def _when(ms: int | None) -> str:
    if not ms:
        return "?"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def score_section(entry: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    """The markdown of one evaluation set: a heading, what the set is, and its score table."""
    title = f"`{entry['name']}`" if not entry["legacy"] else f"set `{entry['hash']}` (recorded before sets were named)"
    lines = [f"### Scores on {title}", ""]
    about = []
    if not entry["legacy"]:
        about.append(f"set hash `{entry['hash']}`")
    if evaluation and "missing_run" not in evaluation:
        about.append(f"evaluated {_when(evaluation.get('start_time'))}")
        classification = any(m.startswith(("knn", "linear")) for m in entry["scores"])
        for d in evaluation.get("inputs", []):
            if d["name"] == entry["name"] or (classification and d["context"] == "training"):
                about.append(f"{d['context'] or 'data'}: {d['name']}")
        run_path = f"experiments/{evaluation['experiment_id']}/runs/{evaluation['run_id']}"
        about.append(_link("evaluation run", run_path) if mlflow_ui_link(run_path) else
                     f"evaluation run `{evaluation['run_id']}`")
        report = evaluation["tags"].get(REPORT_TAG)
        if report:
            about.append(_link("evaluation report", f"{run_path}/artifacts/{report}") if mlflow_ui_link(run_path)
                         else f"evaluation report: artifact `{report}` of run `{evaluation['run_id']}`")
    elif entry.get("run_id"):
        about.append(f"evaluation run `{entry['run_id']}`")
    # the UI's markdown tables have no cell padding (and drop alignment): an em space keeps label and value apart
    lines += [" · ".join(about), "", "| score | % |", "|---|---:|"]
    lines += [f"| {_cell(label(m))}&emsp; | **{display(entry['scores'][m])}** |" for m in ordered(entry["scores"])]
    return lines + [""]


def summary_line(name: str, version: int, training: dict[str, Any], sets: list[dict[str, Any]]) -> str:
    """The card's first line, plain text: the registered model's version list shows it raw and cut to a few words,
    so it starts with the headline score (``85.12 % k-NN 20 top-1 on imagenette-128-val · ...``)."""
    params = training.get("params") or {}
    tags = training.get("tags") or {}
    parts = []
    for entry in sets[:2]:
        first = headline(entry["scores"])
        shown = [first] + [m for m in ordered(entry["scores"]) if m.startswith("linear") and m != first][:1]
        parts.append(", ".join(f"{display(entry['scores'][m])} % {label(m)}" for m in shown if m)
                     + f" on {entry['name']}")
    if not sets:
        parts.append("not evaluated yet")
    arch = params.get("model.arch") or tags.get("architecture")
    patch = params.get("model.patch_size")
    model = f"DINO {arch}/{patch}" if arch and patch and patch != "None" else f"DINO {arch or 'backbone'}"
    data = training_set_name(training, {})
    parts.append(model + (f" trained on {data}" if data else ""))
    return " · ".join(parts)


def render_version_card(name: str, version: int, version_tags: dict[str, str], training: dict[str, Any],
                        sets: list[dict[str, Any]], evaluations: dict[str, dict[str, Any]]) -> str:
    """The version's card as markdown (see the module docstring)."""
    lines = [summary_line(name, version, training, sets), "",
             f"**{name} v{version}**: a DINO teacher backbone (self-supervised ViT; features = the [CLS] token). "
             f"Load it with `dino_model.export.load_backbone(\"models:/{name}/{version}\")` or "
             f"`mlflow.pyfunc.load_model(\"models:/{name}/{version}\")`.", "",
             "### Training", ""]
    lines += [f"- **{k}**: {v}" for k, v in training_rows(training, version_tags)]
    lines.append("")
    fast = fast_path_rows(version_tags, training)
    if fast:
        lines += ["### Fast path", "", "| check | verdict | path taken | figures |", "|---|---|---|---|"]
        lines += [f"| {_cell(check)}&emsp; | {_cell(verdict)} | {_cell(path)} | {_cell(figures)} |"
                  for check, verdict, path, figures in fast]
        lines.append("")
    if not sets:
        lines += ["### Scores", "", f"Not evaluated yet: `dino evaluate models:/{name}/{version} --train ... "
                  "--val ...`.", ""]
    else:
        lines += ["All scores are in **percent** (accuracies; attention Jaccard and DAVIS J / F / J&F x 100), rounded "
                  "to 2 decimals; the version tags `eval.<set>.<metric>` hold the same values. Two versions' scores "
                  "are comparable when their set hashes match.", ""]
        for entry in sets:
            lines += score_section(entry, evaluations.get(entry.get("run_id") or "", {}))
    lines.append(f"_Card written by dino-pipeline, {_when(int(time.time() * 1000))}._")
    return "\n".join(lines)


def render_model_description(name: str, aliases: dict[str, int]) -> str:
    """The registered model's description: what the model is, and which alias means what (with the version each
    points to now)."""
    lines = [f"**{name}**: DINO self-supervised vision backbones (teacher weights, timm-compatible ViT / ResNet), "
             "trained by `dino-pretrain` and evaluated by `dino-evaluate` (weighted k-NN, linear probe, attention "
             "maps, DAVIS label propagation).", "", "Aliases:", ""]
    for alias, meaning in ALIASES.items():
        now = f" (now v{aliases[alias]})" if alias in aliases else " (not set yet)"
        lines.append(f"- **{alias}**{now}: {meaning}.")
    others = sorted(set(aliases) - set(ALIASES))
    for alias in others:
        lines.append(f"- **{alias}** (now v{aliases[alias]}): set by hand.")
    lines += ["", "Each version's description is its model card: training data, architecture, steps, wall time, "
                  "hardware and its scores per evaluation set, in percent. Version tags `eval.<set>.<metric>` hold "
                  "the scores (2 decimals), `eval.<set>.set_hash` which exact set they were measured on.", "",
              f"Load a version: `dino_model.export.load_backbone(\"models:/{name}@champion\")`."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------------------


def build_card(client, name: str, version: int) -> tuple[str, str]:
    """(version card, registered-model description) of ``name`` version ``version``, from what MLflow holds."""
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    training = _training_facts(client, mv.run_id)
    sets = evaluation_sets(tags)
    evaluations = {e["run_id"]: _evaluation_facts(client, e["run_id"]) for e in sets if e.get("run_id")}
    model = client.get_registered_model(name)
    aliases = {a: int(v) for a, v in (getattr(model, "aliases", None) or {}).items()}
    return render_version_card(name, version, tags, training, sets, evaluations), \
        render_model_description(name, aliases)


@task(name="update-model-card", cache_policy=NO_CACHE)
def update_model_card(name: str, version: int) -> str:
    """Write the model card of ``name`` version ``version`` (its description) and the registered model's
    description from what MLflow holds now; returns the card's markdown."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    card, description = build_card(client, name, version)
    client.update_model_version(name, str(version), description=card)
    client.update_registered_model(name, description=description)
    return card


def version_page(name: str, version: int) -> str:
    """The UI path of a version's page (its model card)."""
    return f"models/{quote(name, safe='')}/versions/{version}"
