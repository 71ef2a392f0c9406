"""Model references: a registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or a backbone on disk
or S3 (an export folder, its ``.safetensors``, a training checkpoint or a folder of them, a facebookresearch/dino
checkpoint). Checked by syntax and, for local paths, by what is there, without loading anything."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelVersionNotFound, UserInputError

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))/?$")
#: What a registered model's name may be here: it becomes part of URIs and tags (MLflow itself is more lenient).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".ckpt")
EXPORT_FILES = ("config.json", "backbone.safetensors")

REGISTER_HINT = "register it first with `dino register {path} --name NAME`, then use models:/NAME@candidate"


def parse_model_uri(model: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> (name, version, alias). Anything else raises
    :class:`ModelVersionNotFound` saying what is accepted (and, for a path, how to register it)."""
    m = _MODEL_URI.match(model or "")
    if not m:
        hint = f"; for an export or checkpoint, {REGISTER_HINT.format(path=model)}" if not str(model).startswith(
            "models:") else ""
        raise ModelVersionNotFound(f"model must be models:/<name>/<version> or models:/<name>@<alias>, got "
                                   f"{model!r}{hint}")
    return m.group("name"), m.group("version"), m.group("alias")


def check_model_name(name: str) -> str:
    """A registered-model name: letters, digits, ``_``, ``.``, ``-`` (starting with a letter or digit)."""
    if not _MODEL_NAME.match(name or ""):
        raise UserInputError(f"--name {name!r}: a registered model name is letters, digits, '_', '.' and '-' "
                             "(e.g. dino-vits16)")
    return name


def backbone_path_kind(path: str) -> str:
    """What a local backbone path holds: ``export``, ``safetensors``, ``checkpoint`` (a file) or ``checkpoints``
    (a folder of ``checkpoint-*.pt``). ``s3://`` and ``file://`` URIs are ``remote``: they are read when used.
    Raises :class:`UserInputError` naming what is accepted."""
    if path.startswith("s3://"):
        return "remote"
    local = Path(path.removeprefix("file://")).expanduser()
    accepted = ("an export folder (config.json + backbone.safetensors), its .safetensors file, a training "
                "checkpoint (.pt) or a folder of them, or a facebookresearch/dino checkpoint (.pth)")
    if not local.exists():
        raise UserInputError(f"{path} does not exist: give {accepted}, or a registered model models:/NAME@ALIAS")
    if local.is_file():
        name = local.name.lower()
        if name.endswith(".safetensors"):
            return "safetensors"
        if name.endswith(CHECKPOINT_SUFFIXES):
            return "checkpoint"
        raise UserInputError(f"{path} is neither a .safetensors nor a checkpoint file "
                             f"({', '.join(CHECKPOINT_SUFFIXES)}): give {accepted}")
    if all((local / f).is_file() for f in EXPORT_FILES):
        return "export"
    if any(local.glob("checkpoint-*.pt")):
        return "checkpoints"
    raise UserInputError(f"{path} is a folder without {' + '.join(EXPORT_FILES)} nor checkpoint-*.pt files: give "
                         f"{accepted}")


def check_backbone_reference(model: str) -> str:
    """A model ``dino extract`` / ``dino register`` can load: a ``models:/`` URI (syntax checked) or a backbone
    path (:func:`backbone_path_kind`). Returns the kind: ``registered`` or the path's kind."""
    if str(model).startswith("models:"):
        parse_model_uri(model)
        return "registered"
    return backbone_path_kind(model)
