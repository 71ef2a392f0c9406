"""The evaluation report as a task: gather its inputs (the Parquet features, the shard sets, the backbone, DAVIS),
build the self-contained HTML page with :mod:`dino_model.eval.report`, and log it to the evaluation run as
``report/evaluation-report.html`` (tag ``report.artifact`` names it; the model card links to it)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..model_card import REPORT_TAG
from .common import run_logger
from .features import load_model
from .settings import EvaluationSettings, resolve_device

#: Where the report goes among the evaluation run's artifacts.
REPORT_PATH = "report/evaluation-report.html"
#: Val queries x training neighbours of the retrieval section; images of the attention section.
QUERIES, NEIGHBOURS, ATTENTION_IMAGES = 16, 8, 3
#: The report's sections, top to bottom.
SECTION_ORDER = ("scores", "retrieval", "knn", "attention", "davis", "feature-map")


def _read_split(uri: str, split: str):
    from dino_model.eval.features import read_features
    from dino_model.eval.report import Split

    keys, labels, feats, _ = read_features(uri, split)
    return Split(labels=labels.astype("int64"), features=feats, keys=list(keys))


@task(name="evaluation-report", cache_policy=NO_CACHE)
def build_evaluation_report(model: dict[str, Any], settings: EvaluationSettings, facts: dict[str, Any],
                            names: dict[str, str], hashes: dict[str, str], features: dict[str, str],
                            metrics: dict[str, float], families: dict[str, str], run_id: str) -> str:
    """Build the evaluation report of ``model`` (what :func:`flows.evaluate.dino_evaluate` computed: ``features``
    by kind, ``metrics`` in percent) and log it to the run ``run_id``. Returns the artifact path."""
    from mlflow.tracking import MlflowClient

    from dino_model.eval import report as rp
    from dino_model.eval.davis_propagation import PropagationConfig
    from dino_model.eval.shard_source import EvalShardSet

    logger = run_logger()
    chosen = settings.selected()
    device = resolve_device(settings.device)
    set_of = {m: names[families[m]] for m in metrics if families.get(m) in names}
    sections = {"scores": rp.scores_section(metrics, set_of)}
    backbone = None

    def model_once():
        nonlocal backbone
        if backbone is None:
            backbone = load_model(model["uri"], device)
        return backbone

    val_images = None
    if features and settings.train_data and settings.val_data:
        train_set, val_set = EvalShardSet(settings.train_data), EvalShardSet(settings.val_data)
        uri = features.get("cls") or next(iter(features.values()))
        train, val = _read_split(uri, "train"), _read_split(uri, "val")
        labels = rp.class_display_names(train_set.classes, train_set.manifest.class_names)
        sections["retrieval"] = rp.retrieval_section(train, val, train_set, val_set, labels, QUERIES, NEIGHBOURS,
                                                     device)
        if "knn" in chosen:
            k = 20 if 20 in settings.knn_ks else settings.knn_ks[0]
            sections["knn"] = rp.knn_section(train, val, labels, k, settings.knn_temperature,
                                             metrics.get(f"knn{k}_top1"), device)
        sections["feature-map"] = rp.feature_map_section(val, labels)
        rows = rp.pick_queries(val.labels, ATTENTION_IMAGES)
        fetched = val_set.fetch(rows)
        val_images = [(fetched[r][1], f"val image {fetched[r][0]} ({labels[int(val.labels[r])]})") for r in rows]
    if "attention" in chosen:
        sections["attention"] = rp.attention_section(
            model_once(), settings.davis_root, facts["davis_sequences"], ATTENTION_IMAGES,
            settings.attention_frame_step, settings.attention_max_frames, settings.attention_size,
            settings.attention_threshold, device)
    elif val_images:
        sections["attention"] = rp.attention_images_section(model_once(), val_images, settings.crop_size,
                                                            settings.attention_threshold, device)
    if "davis" in chosen:
        cfg = PropagationConfig(short_side=settings.davis_short_side, multiple=settings.davis_multiple)
        sections["davis"] = rp.davis_section(model_once(), settings.davis_root, facts["davis_sequences"][0], cfg,
                                             settings.davis_max_frames, device=device)
    ordered_sections = [sections[k] for k in SECTION_ORDER if k in sections]

    run_facts = [("model", f"{model['uri']} ({model['name']} version {model['version']})"),
                 ("evaluations", ", ".join(chosen)), ("evaluation run", run_id)]
    for fam, name in names.items():
        described = facts.get(f"{fam}_set", "")
        run_facts.append((f"evaluation set: {name}", f"hash {hashes.get(fam, '?')}; {described}"))
    resize = f"short side {settings.resize_size}" if settings.resize_size else "no resize"
    run_facts.append(("preprocessing", f"{resize}, centre crop {settings.crop_size}, {settings.precision}"))
    page = rp.render_report(f"Evaluation of {model['name']} v{model['version']}", run_facts, ordered_sections)
    client = MlflowClient()
    client.log_text(run_id, page, REPORT_PATH)
    client.set_tag(run_id, REPORT_TAG, REPORT_PATH)
    logger.info("evaluation report (%d sections, %.1f MB) logged to run %s as %s", len(ordered_sections),
                len(page) / 1e6, run_id, REPORT_PATH)
    return REPORT_PATH
