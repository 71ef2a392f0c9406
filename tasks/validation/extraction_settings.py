"""``dino-extract``'s groups of settings (:mod:`.settings_groups`): which features and how they are computed
(``features``) and where the extraction runs (``runner``); and the flat parameter names they replace, still
accepted with a deprecation warning::

    prefect deployment run dino-extract/default --param model=models:/dino-backbone@champion \\
        --param data=s3://dino/shards/val --param output=s3://dino/features/v3 \\
        --param features='{"n_last_blocks": 4}' --param runner='{"task_runner": "tcp://10.0.0.5:8786"}'

Prefect-free: the ``dino`` command builds the same groups before Prefect starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .settings_groups import Renamed, RunnerSettings, SettingsGroup


class FeatureSettings(SettingsGroup):
    """Which features of each image are written and how they are computed."""

    resize_size: int | None = Field(256, description="Short side before the centre crop (reference 256, bicubic); "
                                                     "None keeps the size.")
    crop_size: int | None = Field(224, description="Centre-crop side (reference 224); None keeps the resized image "
                                                   "(equal sizes needed).")
    batch_size: int = Field(64, description="Images per forward pass.")
    n_last_blocks: int = Field(1, description="Features = [CLS] of the last n blocks concatenated (1 = the k-NN "
                                              "features).")
    avgpool: bool = Field(False, description="Append the average of the last block's patch tokens.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 (reference) or bf16 autocast.")
    fast_path_check: Literal["fallback", "strict", "off"] = Field(
        "fallback", description="With bf16: compare bf16 with fp32 features on the first batch; fallback extracts "
                                "in fp32 when that fails, strict fails, off skips the check.")
    feature_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How the features are stored: float32, or float16 (half the bytes on disk and in "
                               "memory; k-NN and probe top-1 move by under 0.1 point, docs/benchmarks.md).")


class ExtractionRunnerSettings(RunnerSettings):
    """Where the extraction runs: the device, torchrun processes, or one task per sample range on a task runner."""

    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1'...")
    nproc_per_node: int = Field(1, description="Extraction processes: 1 = in the flow's process; G > 1 = torchrun "
                                               "--nproc_per_node=G -m dino_model.eval.extract (one GPU each), each "
                                               "over a contiguous range of the samples (part-r<rank>-*.parquet).")
    task_runner: str = Field("threads", description="'threads' (in the flow's process, or under torchrun), or where "
                             "one task per contiguous sample range runs, each writing part-r<range>-*.parquet: "
                             "'processes' (this machine), 'dask' (a local Dask cluster) or 'tcp://HOST:PORT' (a "
                             "running Dask scheduler; its workers need this project, the model's and the data's "
                             "credentials). Each worker process loads the backbone once.")
    parallelism: int = Field(2, description="Worker processes of 'processes' / 'dask' (a tcp:// cluster has its "
                                            "own).")


#: The groups, by parameter name.
EXTRACT_GROUPS = {"features": FeatureSettings, "runner": ExtractionRunnerSettings}

#: The flat parameters of ``dino-extract`` before the groups, and where each went.
EXTRACT_RENAMES = {
    **{name: Renamed("features", name) for name in FeatureSettings.model_fields if name != "feature_dtype"},  # newer
    **{name: Renamed("runner", name) for name in ExtractionRunnerSettings.model_fields},
}
