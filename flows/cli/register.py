"""``dino register``: a backbone on disk or S3 as a new version of an MLflow registered model, so ``dino evaluate``
(which evaluates registered versions) can score it. The same registration ``dino-pretrain`` does at the end of a
training (:func:`tasks.pretrain.registration.register_export`); no Prefect flow: one MLflow run, nothing to
orchestrate.

    dino register ./run1/checkpoints/export --name my-vits16                # an export folder
    dino register ./run1/checkpoints --name my-vits16                       # the latest training checkpoint
    dino register dino_deitsmall16_pretrain_full_checkpoint.pth --name ref-vits16 --alias reference
    dino evaluate models:/my-vits16@candidate --train SHARDS --val SHARDS

A checkpoint (this project's, or a facebookresearch/dino one) is exported first (its teacher backbone, as
:func:`dino_model.export.export_backbone` writes it); an export is registered as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile

from .common import UsageError, command, print_mlflow_hint, use_embedded_mlflow

_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def _configure_register(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="EXPORT_OR_CHECKPOINT",
                   help="export folder (config.json + backbone.safetensors) or its .safetensors file, a training "
                        "checkpoint (.pt) or a folder of them (the latest), a facebookresearch/dino checkpoint "
                        "(.pth); local path or s3://")
    p.add_argument("--name", required=True, help="MLflow registered model receiving the new version")
    p.add_argument("--alias", default="candidate", help="alias pointed at the new version (default candidate)")
    p.add_argument("--experiment", default="dino-register",
                   help="MLflow experiment of the registration run (default dino-register)")


@command("register", "register an export or checkpoint as a model version, for dino evaluate", _configure_register)
def run_register(args: argparse.Namespace) -> int:
    from tasks.validation import check_backbone_reference, check_model_name

    check_model_name(args.name)
    if not _ALIAS.match(args.alias) or args.alias.lower() == "latest" or re.fullmatch(r"v\d+", args.alias):
        raise UsageError(f"--alias {args.alias!r}: letters, digits, '_' and '-', not 'latest' nor v<number> "
                         "(MLflow reserves them)")
    kind = check_backbone_reference(args.source)
    if kind == "registered":
        raise UsageError(f"{args.source} is already a registered model: evaluate it as it is")
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    from mlflow.tracking import MlflowClient

    from tasks.pretrain.registration import register_export
    from tasks.tracking import get_or_create_experiment

    with tempfile.TemporaryDirectory() as tmp:
        export_uri, arch = _as_export(args.source, kind, tmp)
        client = MlflowClient()
        run = client.create_run(get_or_create_experiment(client, args.experiment), run_name=f"register {args.name}",
                                tags={"source": args.source, "architecture": arch})
        try:
            version = register_export(run.info.run_id, export_uri, args.name,
                                      {"source": args.source, "architecture": arch, "mlflow_run_id": run.info.run_id},
                                      args.alias)
        except BaseException:
            client.set_terminated(run.info.run_id, status="FAILED")
            raise
        client.set_terminated(run.info.run_id, status="FINISHED")
    print(f"registered {args.name} version {version} (alias {args.alias!r}) from {args.source}; "
          f"MLflow run {run.info.run_id}")
    print(f"evaluate it: dino evaluate models:/{args.name}/{version} --train TRAIN_SHARDS --val VAL_SHARDS")
    print_mlflow_hint()
    return 0


def _as_export(source: str, kind: str, tmp: str) -> tuple[str, str]:
    """(export URI, ``arch/patch``): the export itself, or the checkpoint's teacher backbone exported to ``tmp``."""
    from dino_model.export import CONFIG_NAME, WEIGHTS_NAME, export_backbone, infer_arch, load_backbone
    from dino_model.export import load_export_config
    from dino_model.storage import StorageError, open_store

    try:
        if kind in ("export", "remote"):
            store = open_store(source)
            if store.exists(CONFIG_NAME) and store.exists(WEIGHTS_NAME):
                cfg = load_export_config(source)
                return source, f"{cfg['arch']}/{cfg['patch_size']}"
        backbone = load_backbone(source)
    except (ValueError, StorageError, OSError) as e:  # not loadable: say which file and why, in one line
        raise UsageError(f"{source}: cannot load a backbone from it: {e}") from e
    state = backbone.state_dict()
    arch, patch_size = infer_arch(state)
    img_size = 224
    if "pos_embed" in state:  # the grid the position embeddings were learned at (e.g. 14 x 14 at patch 16)
        img_size = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * patch_size
    export_backbone(backbone, tmp, arch=arch, patch_size=patch_size, img_size=img_size)
    return tmp, f"{arch}/{patch_size}"
