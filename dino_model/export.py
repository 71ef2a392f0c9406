"""Teacher-backbone export (safetensors + JSON config) and :func:`load_backbone` for every way weights are stored.

An export is a folder (local or ``s3://``) holding two objects::

    backbone.safetensors   the teacher backbone's state_dict, key names of timm's VisionTransformer / ResNet
    config.json            {"format", "arch", "patch_size", "img_size", "embed_dim", "timm_name", "step",
                            "epoch", "training_config"}

so the weights load straight into timm, without this project and without the internet::

    timm.create_model("vit_small_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="export/backbone.safetensors"), num_classes=0)

(``timm_name`` in ``config.json`` names the matching model; timm has no ``vit_tiny_patch8_224``, so that one is
``null`` and only :func:`load_backbone` rebuilds it.)

:func:`load_backbone` rebuilds this project's backbone (reference position-embedding interpolation, attention
maps) from any of: an export folder or its ``.safetensors`` file, a training checkpoint file or a checkpoint
folder (its latest checkpoint), or a facebookresearch/dino checkpoint. URIs with a scheme other than local paths,
``file://`` and ``s3://`` go to :data:`BACKBONE_LOADERS` — the MLflow issue registers ``models:/`` there with
:func:`register_backbone_loader`.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from dino_model.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, read_checkpoint
from dino_model.models import VIT_CONFIGS, build_backbone
from dino_model.reference_checkpoint import load_reference_checkpoint, strip_prefix
from dino_model.storage import ObjectNotFound, open_store

__all__ = [
    "EXPORT_FORMAT",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "timm_model_name",
    "export_backbone",
    "load_backbone",
    "load_export_config",
    "register_backbone_loader",
    "BACKBONE_LOADERS",
    "infer_arch",
]

EXPORT_FORMAT = "dino_model.export/v1"
WEIGHTS_NAME = "backbone.safetensors"
CONFIG_NAME = "config.json"

# timm models whose VisionTransformer/ResNet matches ours parameter for parameter (names, shapes, LayerNorm eps
# 1e-6, qkv bias, class token, no classifier when num_classes=0).
_TIMM_NAMES = {
    ("vit_tiny", 16): "vit_tiny_patch16_224",
    ("vit_small", 16): "vit_small_patch16_224",
    ("vit_small", 8): "vit_small_patch8_224",
    ("vit_base", 16): "vit_base_patch16_224",
    ("vit_base", 8): "vit_base_patch8_224",
}


def timm_model_name(arch: str, patch_size: int, img_size: int = 224) -> str | None:
    """The timm model to pass to ``timm.create_model`` for an export, or ``None`` if timm has none."""
    if arch == "resnet50":
        return "resnet50"
    if img_size != 224:
        return None
    return _TIMM_NAMES.get((arch, patch_size))


def export_backbone(
    backbone: nn.Module,
    uri: str,
    *,
    arch: str,
    patch_size: int,
    img_size: int = 224,
    step: int | None = None,
    epoch: int | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``backbone``'s weights and a config beside them under ``uri`` (folder or ``s3://`` prefix).

    Weights are written before the config, each atomically, so a folder with a ``config.json`` always has its
    weights. Returns ``{"weights": URI, "config": URI}``.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    # BatchNorm's num_batches_tracked is an int64 counter, not a weight; timm's resnet50 has it too, keep it.
    config = {
        "format": EXPORT_FORMAT,
        "arch": arch,
        "patch_size": patch_size,
        "img_size": img_size,
        "embed_dim": int(getattr(backbone, "embed_dim", 0)),
        "timm_name": timm_model_name(arch, patch_size, img_size),
        "step": step,
        "epoch": epoch,
        "training_config": dict(training_config) if training_config is not None else None,
    }
    store = open_store(uri)
    store.put_bytes(WEIGHTS_NAME, safetensors_save(state, metadata={"format": "pt", "arch": arch}))
    store.put_bytes(CONFIG_NAME, json.dumps(config, indent=2).encode("utf-8"))
    return {"weights": store.url(WEIGHTS_NAME), "config": store.url(CONFIG_NAME)}


def load_export_config(uri: str) -> dict[str, Any]:
    """``config.json`` of an export folder."""
    return json.loads(open_store(uri).get_bytes(CONFIG_NAME))


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(arch, patch_size) of a backbone state_dict from its shapes (for checkpoints that don't say)."""
    if "layer1.0.conv1.weight" in state:
        return "resnet50", 16
    if "patch_embed.proj.weight" not in state:
        raise ValueError("cannot tell the architecture: no patch_embed.proj.weight nor layer1.0.conv1.weight")
    w = state["patch_embed.proj.weight"]
    embed_dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, (dim, d, _) in VIT_CONFIGS.items():
        if dim == embed_dim and d == depth:
            return name, patch
    raise ValueError(f"no known ViT has embed_dim {embed_dim} and depth {depth}")


def _build_and_load(state: Mapping[str, torch.Tensor], arch: str | None, patch_size: int | None,
                    img_size: int) -> nn.Module:
    inferred_arch, inferred_patch = infer_arch(state)
    arch = arch or inferred_arch
    patch_size = patch_size or inferred_patch
    if "pos_embed" in state and arch != "resnet50":
        # The grid the position embeddings were learned at fixes img_size (e.g. 14x14 -> 224 at patch 16).
        side = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
        img_size = side * patch_size
    backbone = build_backbone(arch, patch_size=patch_size, drop_path_rate=0.0, img_size=img_size)
    missing, unexpected = backbone.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit a {arch}/{patch_size} backbone: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return backbone.eval()


# ------------------------------------------------------------------------------------------------------------------
# load_backbone and its scheme handlers
# ------------------------------------------------------------------------------------------------------------------

BackboneLoader = Callable[[str], nn.Module]

#: URI scheme -> loader. Local paths, ``file://`` and ``s3://`` are handled by :func:`load_backbone` itself;
#: other schemes (``models:/`` for the MLflow registry) are looked up here.
BACKBONE_LOADERS: dict[str, BackboneLoader] = {}
#: Modules that register a scheme's loader when imported, so ``load_backbone("models:/...")`` just works.
_LOADER_MODULES = {"models": "dino_model.mlflow_model"}


def register_backbone_loader(scheme: str, loader: BackboneLoader) -> None:
    """Make ``load_backbone("<scheme>:...")`` call ``loader(uri)`` (e.g. ``"models"`` for MLflow's registry)."""
    if not scheme or ":" in scheme or "/" in scheme:
        raise ValueError(f"scheme must be a bare name like 'models', got {scheme!r}")
    BACKBONE_LOADERS[scheme] = loader


def load_backbone(uri: str | os.PathLike, arch: str | None = None, patch_size: int | None = None) -> nn.Module:
    """This project's backbone, in eval mode, with the weights found at ``uri``:

    * an export folder (``config.json`` + ``backbone.safetensors``) or the ``.safetensors`` file itself,
    * a training checkpoint file (``checkpoint-*.pt``: the teacher's backbone) or a folder of them (the latest),
    * a facebookresearch/dino checkpoint (``.pth``: the teacher's backbone, or a bare backbone state_dict),
    * any URI whose scheme is registered in :data:`BACKBONE_LOADERS`.

    ``arch`` / ``patch_size`` override what the stored config says or what the weights' shapes imply.
    """
    uri = os.fspath(uri)
    scheme = urlparse(uri).scheme
    if scheme and scheme not in ("file", "s3") and len(scheme) > 1:
        if scheme not in BACKBONE_LOADERS and scheme in _LOADER_MODULES:
            importlib.import_module(_LOADER_MODULES[scheme])  # registers itself (MLflow is imported on demand)
        if scheme not in BACKBONE_LOADERS:
            raise ValueError(
                f"no backbone loader for scheme {scheme!r} in {uri!r}; registered: {sorted(BACKBONE_LOADERS)}"
            )
        return BACKBONE_LOADERS[scheme](uri)

    base = uri.rstrip("/")
    if base.endswith(".safetensors"):
        return _load_export(base.rsplit("/", 1)[0] if "/" in base else ".", base.rsplit("/", 1)[-1],
                            arch, patch_size)
    if base.endswith((".pt", ".pth", ".pth.tar", ".ckpt")):
        return _load_checkpoint_file(base, arch, patch_size)
    store = open_store(base)
    if store.exists(CONFIG_NAME) and store.exists(WEIGHTS_NAME):
        return _load_export(base, WEIGHTS_NAME, arch, patch_size)
    latest = latest_checkpoint(base)
    if latest is not None:
        return _load_checkpoint_file(latest, arch, patch_size)
    raise ObjectNotFound(
        f"{uri}: neither an export ({CONFIG_NAME} + {WEIGHTS_NAME}), nor a checkpoint file, nor a folder of "
        "checkpoint-*.pt files"
    )


def _load_export(folder: str, weights_key: str, arch: str | None, patch_size: int | None) -> nn.Module:
    store = open_store(folder)
    state = safetensors_load(store.get_bytes(weights_key))
    img_size = 224
    if store.exists(CONFIG_NAME):
        cfg = json.loads(store.get_bytes(CONFIG_NAME))
        arch = arch or cfg.get("arch")
        patch_size = patch_size or cfg.get("patch_size")
        img_size = int(cfg.get("img_size") or 224)
    return _build_and_load(state, arch, patch_size, img_size)


def _load_checkpoint_file(uri: str, arch: str | None, patch_size: int | None) -> nn.Module:
    try:
        ckpt = read_checkpoint(uri)
    except Exception as ours_error:  # noqa: BLE001 - not ours (or not weights_only-plain): try the reference
        if isinstance(ours_error, ObjectNotFound):
            raise
        ref = load_reference_checkpoint(uri)
        args = ref["args"]
        return _build_and_load(ref["teacher_backbone"], arch or args.get("arch"),
                               patch_size or args.get("patch_size"), 224)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        model_cfg = ckpt["config"]["model"]
        backbone = {k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
        return _build_and_load(backbone, arch or model_cfg["arch"], patch_size or model_cfg["patch_size"],
                               int(model_cfg.get("img_size", 224)))
    # A reference checkpoint that happened to load without argparse.Namespace (or a bare state_dict).
    if "teacher" in ckpt or "student" in ckpt:
        ref = load_reference_checkpoint(uri)
        args = ref["args"]
        return _build_and_load(ref["teacher_backbone"], arch or args.get("arch"),
                               patch_size or args.get("patch_size"), 224)
    state = strip_prefix(ckpt, ["module.backbone.", "backbone.", "module."])
    return _build_and_load(state, arch, patch_size, 224)
