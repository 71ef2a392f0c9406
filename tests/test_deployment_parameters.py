"""Deployment parameters as an operator passes them: Prefect merges a run's parameters with its deployment's only
at the top level, so a partial ``settings`` dict is merged onto the deployment's own settings by the flows
(tasks/evaluation/settings.py). The end-to-end check through a real server and worker is in test_deployments.py."""

from __future__ import annotations

import pytest
import yaml

from flows.evaluate import dino_evaluate, dino_reevaluate
from tasks.evaluation import EvaluationInputError
from tasks.evaluation.settings import EvaluationSettings, merge_settings
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
