"""Deployment parameters as an operator passes them: Prefect merges a run's parameters with its deployment's only
at the top level, so a partial ``settings`` dict is merged onto the deployment's own settings by the flows
(tasks/evaluation/settings.py), and so is a partial group of dino-pretrain, dino-shard or dino-extract
(tasks/validation/settings_groups.py), whose old flat names still work with a deprecation warning. The end-to-end
check through a real server and worker is in test_deployments.py (both spellings)."""

from __future__ import annotations

import pytest
import yaml

from flows.evaluate import dino_evaluate, dino_reevaluate
from flows.pretrain import dino_pretrain
from tasks.evaluation import EvaluationInputError
from tasks.evaluation.settings import EvaluationSettings, merge_settings
from prefect.exceptions import SignatureMismatchError

from tasks.flow_parameters import given_flat_names, over_group
from tasks.validation import UserInputError
from tasks.validation.extraction_settings import EXTRACT_GROUPS, EXTRACT_RENAMES
from tasks.validation.pretrain_settings import PRETRAIN_GROUPS, PRETRAIN_RENAMES, KubernetesSettings
from tasks.validation.settings_groups import resolve_groups
from tasks.validation.shard_settings import SHARD_GROUPS, SHARD_RENAMES
from tests.test_deployments import ROOT


def _deployment_settings(entrypoint: str) -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["entrypoint"] == entrypoint]
    return deployment["parameters"]["settings"]


def test_a_partial_settings_parameter_changes_only_its_fields():
    defaults = _deployment_settings("flows/evaluate.py:dino_evaluate")
    # What Prefect does with `--param settings='{"crop_size": 64}'`: validate the run's own dict against the signature.
    params = dino_evaluate.validate_parameters({"model": "models:/m/1", "settings": {"crop_size": 64}})
    merged = merge_settings(defaults, params["settings"])
    assert merged.crop_size == 64
    assert merged.model_dump(exclude={"crop_size"}) == EvaluationSettings(**defaults).model_dump(exclude={"crop_size"})
    assert merged.train_data == defaults["train_data"] and merged.champion_policy == defaults["champion_policy"]


def test_settings_set_explicitly_win_even_when_they_equal_the_class_defaults():
    defaults = {**_deployment_settings("flows/evaluate.py:dino_reevaluate"), "crop_size": 128}
    params = dino_reevaluate.validate_parameters({"settings": {"crop_size": 224, "evaluations": ["knn"]}})
    merged = merge_settings(defaults, params["settings"])
    assert merged.crop_size == 224 and merged.evaluations == ["knn"]
    assert merged.val_data == defaults["val_data"]


def test_a_valid_partial_settings_dict_keeps_the_deployments_other_fields():
    defaults = {**_deployment_settings("flows/evaluate.py:dino_evaluate"), "champion_metric": "knn10_top1"}
    params = dino_evaluate.validate_parameters(
        {"model": "models:/m/1", "settings": {"train_data": "/t", "val_data": "/v", "evaluations": ["knn"]}})
    merged = merge_settings(defaults, params["settings"])
    assert (merged.train_data, merged.evaluations) == ("/t", ["knn"])
    assert merged.champion_metric == "knn10_top1"  # derived defaults of the partial dict are not choices


def test_without_deployment_defaults_the_settings_are_used_as_given():
    given = EvaluationSettings(train_data="/data/t", val_data="/data/v", crop_size=96)
    assert merge_settings(None, given) is given
    assert merge_settings({"train_data": "/data/t", "val_data": "/data/v"}, {"crop_size": 96}).crop_size == 96


def test_a_bad_merged_setting_is_a_user_error_naming_the_field():
    with pytest.raises(EvaluationInputError, match="settings: crop_size"):
        merge_settings(_deployment_settings("flows/evaluate.py:dino_evaluate"), {"crop_size": "big"})
    with pytest.raises(EvaluationInputError, match="nothing to evaluate"):
        merge_settings(None, {"crop_size": 64})


# -- grouped parameters of dino-pretrain, dino-shard and dino-extract ------------------------------------------------
# Their optional settings are groups (launch, kubernetes, tracking / shards, runner / features, runner) merged like
# `settings` above; the flat names the groups replaced still work for now, with a deprecation warning.


def _deployment(entrypoint: str, name: str = "default") -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["entrypoint"] == entrypoint and d["name"] == name]
    return deployment["parameters"]


def test_a_partial_pipeline_evaluation_changes_only_its_fields_of_the_deployments_evaluation():
    """dino-pipeline's ``evaluation``: a run's partial dict (or a model's explicit fields) over the deployment's own
    ``evaluation`` dict; then the workspace's sets and the class's defaults fill in what neither sets."""
    from tasks.validation.pipeline import PipelineRequest

    stored = {"crop_size": 96, "knn_ks": [5], "experiment": "nightly-eval"}
    assert over_group(stored, {"crop_size": 64}) == {"crop_size": 64, "knn_ks": [5], "experiment": "nightly-eval"}
    assert over_group(stored, EvaluationSettings(train_data="/t", val_data="/v", knn_ks=[10])) == {
        "crop_size": 96, "knn_ks": [10], "experiment": "nightly-eval", "train_data": "/t", "val_data": "/v"}
    assert over_group(stored, None) == stored
    assert over_group(None, {"crop_size": 64}) == {"crop_size": 64}  # no deployment, or one without evaluation
    settings = PipelineRequest("train", "val", "/ws", evaluation=over_group(stored, {"crop_size": 64})
                               ).evaluation_settings()
    assert (settings.crop_size, settings.knn_ks, settings.experiment) == (64, [5], "nightly-eval")
    assert (settings.train_data, settings.val_data) == ("/ws/shards/train", "/ws/shards/val")
    assert settings.resize_size == EvaluationSettings.model_fields["resize_size"].default


def test_a_partial_group_changes_only_its_fields_of_the_deployments_group():
    deployment = _deployment("flows/pretrain.py:dino_pretrain")
    # What Prefect does with `--param launch='{"nnodes": 2, "rdzv_endpoint": "h:29400"}'`: the run's group
    # replaces the deployment's at the top level, then the flow validates it against its signature.
    params = dino_pretrain.validate_parameters({**deployment, "launch": {"nnodes": 2, "rdzv_endpoint": "h:29400"}})
    assert not set(params) & set(PRETRAIN_RENAMES)  # no flat name given: none in the run's parameters
    groups, notes = resolve_groups(PRETRAIN_GROUPS, params, {}, PRETRAIN_RENAMES, deployment)
    assert (groups["launch"].nnodes, groups["launch"].rdzv_endpoint) == (2, "h:29400")
    assert groups["launch"].retries == deployment["launch"]["retries"] == 2
    assert groups["tracking"].registered_model == deployment["tracking"]["registered_model"]
    assert groups["kubernetes"] == KubernetesSettings() and notes == []


def test_deprecated_flat_names_still_work_and_name_their_new_spelling():
    deployment = _deployment("flows/pretrain.py:dino_pretrain")
    # A run of today's deployment with yesterday's parameter names (through the API): Prefect validates them at the
    # top level, next to the groups, and the flow gets them as **deprecated.
    params = dino_pretrain.validate_parameters({**deployment, "nproc_per_node": 4, "train_retries": 0,
                                                "k8s_image": "registry.example/dino:0.2", "experiment": "old"})
    flat = given_flat_names(params, PRETRAIN_RENAMES)
    assert flat == {"nproc_per_node": 4, "train_retries": 0, "k8s_image": "registry.example/dino:0.2",
                    "experiment": "old"}
    groups, notes = resolve_groups(PRETRAIN_GROUPS, params, flat, PRETRAIN_RENAMES, deployment)
    assert (groups["launch"].nproc_per_node, groups["launch"].retries) == (4, 0)
    assert groups["launch"].nnodes == deployment["launch"]["nnodes"]  # the deployment's group stays under them
    assert (groups["kubernetes"].image, groups["tracking"].experiment) == ("registry.example/dino:0.2", "old")
    assert sorted(notes) == sorted([
        "parameter 'nproc_per_node' is deprecated: use launch.nproc_per_node (--param launch='{\"nproc_per_node\": 4}')",
        "parameter 'train_retries' is deprecated: use launch.retries (--param launch='{\"retries\": 0}')",
        "parameter 'k8s_image' is deprecated: use kubernetes.image "
        "(--param kubernetes='{\"image\": \"registry.example/dino:0.2\"}')",
        "parameter 'experiment' is deprecated: use tracking.experiment (--param tracking='{\"experiment\": \"old\"}')",
    ])


def test_a_deployment_made_before_the_groups_keeps_working_and_a_new_style_run_overrides_it():
    # Stored by `prefect deploy` from an older prefect.yaml: flat names only.
    old = {"data": "s3://d/shards", "checkpoint_uri": "s3://d/ckpt", "nproc_per_node": 8, "nnodes": 2,
           "rdzv_endpoint": "h:1", "registered_model": "old-model"}
    params = dino_pretrain.validate_parameters({**old, "launch": {"nnodes": 4}})  # a run in the new spelling
    groups, notes = resolve_groups(PRETRAIN_GROUPS, params, given_flat_names(params, PRETRAIN_RENAMES),
                                   PRETRAIN_RENAMES, old)
    assert (groups["launch"].nproc_per_node, groups["launch"].nnodes) == (8, 4)  # the run's group wins
    assert groups["tracking"].registered_model == "old-model"
    assert len(notes) == 4 and all("is deprecated: use " in n for n in notes)


def test_an_unknown_parameter_or_a_bad_group_field_is_an_error_naming_it():
    with pytest.raises(SignatureMismatchError, match="nproc_per_nod"):  # Prefect refuses a misspelt name, as before
        dino_pretrain.validate_parameters({"data": "d", "checkpoint_uri": "c", "nproc_per_nod": 2})
    with pytest.raises(UserInputError, match="unknown parameter.*nproc_per_nod: the flow takes launch, kubernetes"):
        resolve_groups(PRETRAIN_GROUPS, {}, {"nproc_per_nod": 2}, PRETRAIN_RENAMES)
    params = dino_pretrain.validate_parameters({"data": "d", "checkpoint_uri": "c", "launch": {"nnode": 2}})
    with pytest.raises(UserInputError, match="launch.nnode: Extra inputs are not permitted"):
        resolve_groups(PRETRAIN_GROUPS, params, {}, PRETRAIN_RENAMES)
    with pytest.raises(UserInputError, match="runner.task_runner: task_runner must be one of threads"):
        resolve_groups(SHARD_GROUPS, {"runner": {"task_runner": "ray"}}, {}, SHARD_RENAMES)
    with pytest.raises(UserInputError, match="runner.parallelism: parallelism must be a positive integer"):
        resolve_groups(EXTRACT_GROUPS, {}, {"parallelism": 0}, EXTRACT_RENAMES)


def test_every_flat_name_of_the_three_flows_has_a_group_field():
    for groups, renames in ((PRETRAIN_GROUPS, PRETRAIN_RENAMES), (SHARD_GROUPS, SHARD_RENAMES),
                            (EXTRACT_GROUPS, EXTRACT_RENAMES)):
        for flat, renamed in renames.items():
            assert renamed.field in groups[renamed.group].model_fields, flat
    assert set(EXTRACT_RENAMES) == {"resize_size", "crop_size", "batch_size", "n_last_blocks", "avgpool",
                                    "precision", "fast_path_check", "device", "nproc_per_node", "task_runner",
                                    "parallelism"}
    assert set(SHARD_RENAMES) == {"name", "shard_size", "shard_bytes", "seed", "quality", "max_pixels",
                                  "task_runner", "parallelism"}


def test_the_hooks_read_the_experiment_in_either_spelling():
    """The cancellation and crash hooks get the flow run, not the flow's values: they resolve ``tracking`` from its
    stored parameters (top-level flat names of a deployment run, a direct call's **deprecated, or the group)."""
    from types import SimpleNamespace

    from tasks.pretrain.settings import tracking_of

    def run(parameters):
        return SimpleNamespace(parameters=parameters, deployment_id=None)

    assert tracking_of(run({"tracking": {"experiment": "grouped"}})).experiment == "grouped"
    assert tracking_of(run({"experiment": "flat", "run_name": None})).experiment == "flat"
    assert tracking_of(run({})).experiment == "dino-pretrain"


def test_the_run_form_shows_the_groups_and_not_the_flat_names():
    """The schema a deployment stores (and the Prefect UI's run form is built from) lists the groups; the flat
    names are accepted but not offered."""
    from prefect.utilities.callables import parameter_schema

    from flows.extract import dino_extract
    from flows.shard import dino_shard

    for flow, renames in ((dino_pretrain, PRETRAIN_RENAMES), (dino_shard, SHARD_RENAMES),
                          (dino_extract, EXTRACT_RENAMES)):
        properties = parameter_schema(flow).model_dump()["properties"]
        assert properties == flow.parameters.model_dump()["properties"]
        assert not set(properties) & set(renames) and "deprecated" not in properties, flow.name
    assert {"launch", "kubernetes", "tracking"} <= set(parameter_schema(dino_pretrain).model_dump()["properties"])


def test_a_flow_run_with_flat_names_warns_and_shards_as_the_grouped_spelling(tmp_path):
    """dino-shard run twice on the same images: the flat names of yesterday (a DeprecationWarning naming the new
    spelling, also logged in the run's log) and the groups give the same shard set."""
    from dino_model.data.manifest import load_manifest
    from flows.shard import dino_shard
    from tests.datasets import write_colour_set

    write_colour_set(tmp_path / "img", tmp_path / "unused", range(2), 5, 0, "x")
    source = str(tmp_path / "img")
    with pytest.warns(DeprecationWarning, match=r"'shard_size' is deprecated: use shards.shard_size"):
        flat = dino_shard(source, str(tmp_path / "flat"), shard_size=3, seed=4, task_runner="threads")
    grouped = dino_shard(source, str(tmp_path / "grouped"), shards={"shard_size": 3, "seed": 4},
                         runner={"task_runner": "threads"})
    assert (flat.accepted, flat.shards) == (grouped.accepted, grouped.shards) == (10, 4)
    assert load_manifest(str(tmp_path / "flat")).digest() == load_manifest(str(tmp_path / "grouped")).digest()
