"""Input scanners: find every candidate image of a dataset, its key and its label, without reading pixels.

Supported layouts (``kind``):

``imagefolder``  ``root/<class>/**/<file>`` — class index = position of the folder name in the sorted folder list
                 (as torchvision's ImageFolder).
``ilsvrc-train`` the official ``ILSVRC2012_img_train.tar``: a tar of per-class tars (``n01440764.tar`` ...). It is
                 read in place: each image's byte range inside the outer file is recorded from the tar headers,
                 so nothing is extracted to disk and shard tasks can read any image directly.
``ilsvrc-val``   the validation images (a folder, or ``ILSVRC2012_img_val.tar``) plus a label file: Kaggle's
                 ``LOC_val_solution.csv``, or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` together with
                 its ``meta.mat``. Labels go through the WNID to the sorted-WNID class index used for train — never
                 the devkit's own ILSVRC2012_ID numbering.
``flat``         a folder (or plain tar) of unlabelled images; class index -1.

The class map (class index -> class id) comes from an explicit source when one is given — ``classes`` (a text
file of class ids in index order) or ``classes_from`` (a shard set, usually train's: its manifest's classes) —
else from the layout: the sorted class folders or class archives, the devkit's ``meta.mat``, the
``LOC_synset_mapping.txt`` beside a ``LOC_val_solution.csv``, and as a last resort the classes present in the val
label file itself. That last one agrees with train only when both hold the same classes, so a scan that falls
back to it with fewer than ILSVRC-2012's 1000 classes carries a warning (``Scan.warnings``, recorded in the
manifest). ``Scan.class_map`` says which source was used, and its hash.

``detect_kind`` picks one from the path. A scan returns :class:`SourceItem` s (a key, a label, and where the bytes
are) plus the rejects it can decide without reading images: empty class folders, duplicate keys, broken links,
non-regular files, unsafe archive member names, validation images without a label. Folders are walked by real
path (:mod:`.tree_walk`): an image is labelled only by the class folder it really lies in, a link that would
relabel images or loop is rejected rather than followed, and a file reached twice is stored once.

    >>> scan = scan_source(SourceSpec("/data/imagenette-128/train"))
    >>> len(scan.items), scan.classes[:2], scan.rejects[:1]
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import StorageError, open_store
from .images import UNREADABLE, looks_like_image
from .manifest import Reject, class_map_sha256, load_manifest
from .tree_walk import FoundFile, TreeWalker, any_image_under

KINDS = ("auto", "imagefolder", "ilsvrc-train", "ilsvrc-val", "flat")

EMPTY_CLASS = "empty-class-folder"
DUPLICATE_KEY = "duplicate-key"
NO_CLASS_FOLDER = "no-class-folder"
NO_LABEL = "no-label"
UNKNOWN_CLASS = "unknown-class"
UNSAFE_PATH = "unsafe-path"
NOT_A_CLASS_ARCHIVE = "not-a-class-archive"
CORRUPT_ARCHIVE = "corrupt-archive"

#: Classes of ILSVRC-2012: a val class map derived from its labels with fewer classes is a subset of train's.
ILSVRC_NUM_CLASSES = 1000

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_VAL_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True, slots=True)  # slots: ImageNet's train set is 1.28 M of these in memory
class SourceItem:
    """One candidate image: its sample key, label and where its bytes are.

    ``offset`` is ``-1`` for a whole file; otherwise the bytes are ``size`` bytes at ``offset`` inside ``path``
    (an image inside an uncompressed tar, read in place).
    """

    key: str  #: sample key in the shard: only ``[A-Za-z0-9_-]`` (no dots)
    source: str  #: path relative to the source root (for tars: ``outer.tar/inner.tar/member``)
    label: int  #: class index, -1 when unlabelled
    path: str  #: absolute file holding the bytes
    size: int  #: byte count of the image
    mtime: int = 0  #: modification time in ns (file) or seconds (tar member): part of the re-run check
    offset: int = -1

    def read(self) -> bytes:
        """The image's bytes (raises ``OSError`` if the file cannot be read)."""
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"archive ended after {len(data)} of {self.size} bytes")
        return data


@dataclass(frozen=True)
class SourceSpec:
    """What to scan."""

    root: str  #: folder (ImageFolder / flat / val images) or tar file (ILSVRC train tar, val tar)
    kind: str = "auto"  #: one of ``KINDS``; ``auto`` detects it from ``root`` and ``labels``
    labels: str | None = None  #: val label file: ``LOC_val_solution.csv`` or the devkit ground-truth ``.txt``
    meta: str | None = None  #: devkit ``meta.mat`` (ILSVRC2012_ID -> WNID), needed with the devkit ground truth
    classes: str | None = None  #: optional text file whose lines start with the class ids, in index order
    #: optional shard set (local path or URI; usually the train set's) whose manifest's classes give the class map
    classes_from: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.root:
            raise ValueError("source root is empty")
        if self.classes and self.classes_from:
            raise ValueError("classes and classes_from both give the class map: pass one of them "
                             "(--classes FILE or --classes-from SHARDS)")


@dataclass(frozen=True)
class ClassMap:
    """A class-index mapping and where it came from (the manifest's ``inputs.class_map``)."""

    classes: list[str]  #: class index -> class id
    names: dict[str, str]  #: class id -> human name, when known
    source: str  #: one of ``manifest.CLASS_MAP_SOURCES``
    path: str | None  #: absolute path or URI it was read from

    def record(self) -> dict:
        return {"source": self.source, "path": self.path, "classes": len(self.classes),
                "sha256": class_map_sha256(self.classes)}


@dataclass
class Scan:
    """Everything a scan found."""

    kind: str
    root: str
    items: list[SourceItem] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  #: class index -> class id
    class_names: dict[str, str] = field(default_factory=dict)  #: class id -> human-readable name
    class_map: ClassMap | None = None  #: where ``classes`` came from (None: unlabelled)
    warnings: list[str] = field(default_factory=list)  #: problems that do not stop the scan, for a human
    inputs: dict = field(default_factory=dict)  #: what was read (for the manifest)

    @property
    def found(self) -> int:
        """Inputs examined so far: candidates plus scan-time rejects."""
        return len(self.items) + len(self.rejects)


def make_key(relative: str) -> str:
    """The sample key for a relative path: extension dropped, every other character outside ``[A-Za-z0-9_-]``
    (``/``, ``.``, spaces...) replaced by ``_`` — WebDataset splits member names at the first dot."""
    stem = relative.rsplit(".", 1)[0] if "." in posixpath.basename(relative) else relative
    return _KEY_UNSAFE.sub("_", stem)


# --------------------------------------------------------------------------------------------------------------
# detection and validation of the input as a whole


def detect_kind(spec: SourceSpec) -> str:
    """Resolve ``kind="auto"``: a tar whose members are tars is the ILSVRC train archive; a folder or tar with a
    label file is ILSVRC val; a folder with sub-folders is an ImageFolder; otherwise a flat folder."""
    if spec.kind != "auto":
        return spec.kind
    root = Path(spec.root)
    if spec.labels:
        return "ilsvrc-val"
    if root.is_file():
        with _open_plain_tar(root) as tf:
            for m in tf:
                if m.isfile():
                    return "ilsvrc-train" if m.name.endswith(".tar") else "flat"
        return "flat"
    with os.scandir(root) as entries:
        if any(e.is_dir() and not e.name.startswith(".") for e in entries):
            return "imagefolder"
    return "flat"


def check_source(spec: SourceSpec) -> None:
    """Fail with a clear message if the input as a whole is unusable (missing root or label files, wrong type)."""
    root = Path(spec.root)
    if not root.exists():
        raise FileNotFoundError(f"source root {spec.root} does not exist")
    kind = detect_kind(spec)
    if kind in ("imagefolder",) and not root.is_dir():
        raise NotADirectoryError(f"source root {spec.root} must be a folder for kind {kind!r}")
    if kind == "ilsvrc-train" and not root.is_file():
        raise ValueError(f"source root {spec.root} must be the ILSVRC train tar for kind 'ilsvrc-train'")
    if kind == "ilsvrc-val":
        if not spec.labels:
            raise ValueError("labels must name LOC_val_solution.csv or the devkit ground truth for kind 'ilsvrc-val'")
        if not Path(spec.labels).is_file():
            raise FileNotFoundError(f"labels file {spec.labels} does not exist")
        if not spec.labels.endswith(".csv") and not (spec.meta and Path(spec.meta).is_file()):
            raise FileNotFoundError(
                f"meta must name the devkit's meta.mat to read the ground truth {spec.labels} (got {spec.meta!r})"
            )
    if kind == "flat" and (spec.classes or spec.classes_from):
        raise ValueError(f"classes / classes_from give class indices to labelled data; {spec.root} is a flat folder "
                         "of unlabelled images (use an ImageFolder tree, or --labels for ILSVRC val images)")
    explicit_class_map(spec)  # a missing or unusable class source fails here, with its own message


def explicit_class_map(spec: SourceSpec) -> ClassMap | None:
    """The class map the caller gave (``classes`` file or ``classes_from`` shard set), or None. Raises
    ``FileNotFoundError`` / ``ValueError`` naming the option when it cannot be used."""
    if spec.classes:
        path = os.path.abspath(spec.classes)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classes file {spec.classes} does not exist")
        ids, names = _read_class_file(path)
        if not ids:
            raise ValueError(f"classes file {path} lists no class id")
        twice = sorted(c for c, n in Counter(ids).items() if n > 1)
        if twice:
            raise ValueError(f"classes file {path} lists class id(s) {twice[:5]} more than once")
        return ClassMap(ids, names, "classes-file", path)
    if spec.classes_from:
        try:
            store = open_store(spec.classes_from)
            manifest = load_manifest(store)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"classes_from {spec.classes_from}: no shard set there ({e}); give the train "
                                    "shard set's path or URI") from e
        except (ValueError, StorageError) as e:
            raise ValueError(f"classes_from {spec.classes_from}: {e}") from e
        if not manifest.classes:
            raise ValueError(f"classes_from {spec.classes_from} is a shard set of unlabelled images: it has no "
                             "class map to copy")
        return ClassMap(list(manifest.classes), dict(manifest.class_names), "shard-set", store.uri)
    return None


def require_an_image_file(spec: SourceSpec) -> None:
    """Before the scan: raise ``ValueError`` when the source is a folder in which no file (sub-folders and links
    included) starts with an image signature. Stops at the first image: a real dataset costs a few small reads."""
    if Path(spec.root).is_dir() and not any_image_under(spec.root):
        raise ValueError(f"no images found under {spec.root}: no file in it or its sub-folders starts with an image "
                         "signature (JPEG, PNG, GIF, BMP, TIFF or WebP)")


def require_images(scan: Scan, probe_limit: int | None = None) -> None:
    """Raise ``ValueError`` unless at least one candidate starts with an image signature. Reads the first bytes
    of candidates in order and stops at the first image, so a normal dataset costs one small read."""
    if not scan.items:
        raise ValueError(f"no images found under {scan.root} (kind {scan.kind}): {len(scan.rejects)} rejected entries")
    for item in scan.items[: probe_limit or len(scan.items)]:
        try:
            with open(item.path, "rb") as f:
                if item.offset >= 0:
                    f.seek(item.offset)
                if looks_like_image(f.read(min(16, item.size))):
                    return
        except OSError:
            continue
    raise ValueError(f"no images found under {scan.root}: none of {len(scan.items)} files has an image signature")


# --------------------------------------------------------------------------------------------------------------
# scanning


def scan_source(spec: SourceSpec) -> Scan:
    """Scan the input described by ``spec`` (see the module docstring). Items come back sorted by key."""
    check_source(spec)
    kind = detect_kind(spec)
    root = os.path.abspath(spec.root)
    explicit = explicit_class_map(spec)
    if kind == "imagefolder":
        scan = _scan_imagefolder(root)
    elif kind == "flat":
        scan = _scan_flat(root)
    elif kind == "ilsvrc-train":
        scan = _scan_train_tar(root)
    else:
        scan = _scan_val(root, spec, explicit)
    if kind in ("imagefolder", "ilsvrc-train"):
        if explicit is not None:
            _reindex(scan, explicit)
        else:
            scan.class_names = _find_class_names(Path(root), scan.classes)
            source = "folders" if kind == "imagefolder" else "class-archives"
            scan.class_map = ClassMap(list(scan.classes), dict(scan.class_names), source, root)
    scan.inputs = {
        "kind": kind, "root": root, "labels": _absolute(spec.labels), "meta": _absolute(spec.meta),
        "classes": _absolute(spec.classes),
        "classes_from": explicit.path if explicit is not None and explicit.source == "shard-set" else None,
        "class_map": scan.class_map.record() if scan.class_map is not None else None,
        "warnings": list(scan.warnings),
    }
    _drop_duplicate_keys(scan)
    scan.items.sort(key=lambda it: it.key)
    scan.rejects.sort(key=lambda r: r.path)
    return scan


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _file_item(found: FoundFile, root: str, label: int) -> SourceItem:
    return SourceItem(make_key(found.rel), found.rel, label, found.path, found.st.st_size, found.st.st_mtime_ns)


def _scan_imagefolder(root: str) -> Scan:
    scan = Scan("imagefolder", root)
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    class_dirs = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
    scan.classes = [e.name for e in class_dirs]
    for e in entries:
        # Top-level files are not inputs of an ImageFolder (classes.txt, a README...), but an *image* there is
        # probably a misplaced sample: report it rather than drop it silently.
        if e.name.startswith(".") or e.is_dir():
            continue
        try:
            with open(e.path, "rb") as f:
                is_image = looks_like_image(f.read(16))
        except OSError:
            continue
        if is_image:
            scan.rejects.append(Reject(e.name, f"{NO_CLASS_FOLDER}: image at the top level of an ImageFolder tree"))
    # One walk for all classes: an image is labelled by the class folder it really lies in (see tree_walk.py).
    walker = TreeWalker(root)
    # Real class folders first, so a linked class folder that overlaps one of them is the one refused.
    order = sorted(range(len(class_dirs)), key=lambda i: (class_dirs[i].is_symlink(), class_dirs[i].name))
    registered = {i for i in order if walker.add_folder(class_dirs[i].path, i)}
    files, rejects = walker.walk()
    scan.rejects.extend(rejects)
    per_class = Counter(f.label for f in files)
    for label, d in enumerate(class_dirs):
        if label in registered and not per_class[label]:
            scan.rejects.append(Reject(d.name, f"{EMPTY_CLASS}: class {d.name!r} has no files of its own"))
    scan.items.extend(_file_item(f, root, f.label) for f in files)
    return scan


def _walk_root(root: str, scan: Scan) -> list[FoundFile]:
    """Every file of a folder whose layout carries no class folders (flat, ILSVRC val): the root is the boundary."""
    walker = TreeWalker(root)
    walker.add_folder(root, -1)
    files, rejects = walker.walk()
    scan.rejects.extend(rejects)
    return files


def _scan_flat(root: str) -> Scan:
    if os.path.isfile(root):
        scan = Scan("flat", root)
        _scan_image_tar(root, scan, lambda name: -1)
        return scan
    scan = Scan("flat", root)
    scan.items = [_file_item(f, root, -1) for f in _walk_root(root, scan)]
    return scan


# -- tars ------------------------------------------------------------------------------------------------------


def _open_plain_tar(path: str | Path, fileobj=None) -> tarfile.TarFile:
    """Open an uncompressed tar for random access (images are read in place by byte offset)."""
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except tarfile.ReadError as e:
        raise ValueError(
            f"{path} is not an uncompressed tar ({e}); the ILSVRC archives are plain tars — decompress first"
        ) from e


def _unsafe_member(name: str) -> bool:
    norm = posixpath.normpath(name)
    return name.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in name


def _scan_image_tar(tar_path: str, scan: Scan, label_of, base_offset: int = 0, fileobj=None, prefix: str = "",
                    mtime_default: int = 0) -> int:
    """Add every regular member of one (inner or outer) tar of images; returns how many were added."""
    added = 0
    archive_rel = prefix or os.path.basename(tar_path)
    with _open_plain_tar(tar_path, fileobj) as tf:
        for m in tf:
            rel = f"{archive_rel}/{m.name}"
            if m.isdir():
                continue
            if _unsafe_member(m.name):
                scan.rejects.append(Reject(rel, f"{UNSAFE_PATH}: archive member escapes its folder"))
                continue
            if not m.isfile() or m.sparse is not None:
                scan.rejects.append(Reject(rel, f"{UNREADABLE}: archive member is not a regular file"))
                continue
            if posixpath.basename(m.name).startswith("."):
                continue
            label = label_of(m.name)
            if isinstance(label, Reject):
                scan.rejects.append(Reject(rel, label.reason))
                continue
            key = make_key(m.name if not prefix else f"{posixpath.splitext(posixpath.basename(prefix))[0]}/{m.name}")
            scan.items.append(
                SourceItem(key, rel, label, tar_path, m.size, int(m.mtime or mtime_default), base_offset + m.offset_data)
            )
            added += 1
    return added


def _scan_train_tar(tar_path: str) -> Scan:
    scan = Scan("ilsvrc-train", tar_path)
    outer_name = os.path.basename(tar_path)
    inner: list[tarfile.TarInfo] = []
    with _open_plain_tar(tar_path) as tf:
        for m in tf:
            rel = f"{outer_name}/{m.name}"
            if m.isdir():
                continue
            if _unsafe_member(m.name):
                scan.rejects.append(Reject(rel, f"{UNSAFE_PATH}: archive member escapes its folder"))
            elif not m.isfile() or not m.name.endswith(".tar"):
                scan.rejects.append(Reject(rel, f"{NOT_A_CLASS_ARCHIVE}: expected <wnid>.tar"))
            else:
                inner.append(m)
        inner.sort(key=lambda m: posixpath.basename(m.name))
        scan.classes = [posixpath.basename(m.name)[: -len(".tar")] for m in inner]
        for label, m in enumerate(inner):
            # The inner tar is read through the outer file object: headers only, nothing extracted.
            with tf.extractfile(m) as f:
                try:
                    added = _scan_image_tar(
                        tar_path, scan, lambda name, label=label: label, base_offset=m.offset_data, fileobj=f,
                        prefix=f"{outer_name}/{m.name}", mtime_default=int(m.mtime),
                    )
                except ValueError as e:
                    scan.rejects.append(Reject(f"{outer_name}/{m.name}", f"{CORRUPT_ARCHIVE}: {e}"))
                    continue
            if not added:
                scan.rejects.append(Reject(f"{outer_name}/{m.name}", f"{EMPTY_CLASS}: class archive has no files"))
    # Keys of the train tar look like an extracted ImageFolder's: <wnid>_<wnid>_<n>.
    return scan


# -- ILSVRC validation -----------------------------------------------------------------------------------------


def read_loc_val_solution(path: str) -> dict[str, str]:
    """``LOC_val_solution.csv`` (``ImageId,PredictionString``): image id -> WNID (the first box's label)."""
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected a 'ImageId,PredictionString' header, got {header!r}")
        for row in reader:
            if len(row) >= 2 and row[1].split():
                out[row[0].strip()] = row[1].split()[0]
    return out


def read_devkit_meta(path: str) -> tuple[dict[int, str], dict[str, str], list[str]]:
    """The devkit's ``meta.mat``: (ILSVRC2012_ID -> WNID, WNID -> words, sorted leaf WNIDs = the 1000 classes)."""
    from scipy.io import loadmat

    synsets = loadmat(path, squeeze_me=True)["synsets"]
    id_to_wnid: dict[int, str] = {}
    words: dict[str, str] = {}
    leaves: list[str] = []
    for s in synsets:
        sid, wnid = int(s["ILSVRC2012_ID"]), str(s["WNID"])
        id_to_wnid[sid] = wnid
        words[wnid] = str(s["words"])
        if int(s["num_children"]) == 0:
            leaves.append(wnid)
    return id_to_wnid, words, sorted(leaves)


def read_devkit_ground_truth(path: str, id_to_wnid: dict[int, str]) -> dict[str, str]:
    """``ILSVRC2012_validation_ground_truth.txt``: line *i* is the ILSVRC2012_ID of ``ILSVRC2012_val_{i:08d}``."""
    out: dict[str, str] = {}
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                sid = int(line.split()[0])
                if sid not in id_to_wnid:
                    raise ValueError(f"{path}:{i}: ILSVRC2012_ID {sid} is not in meta.mat")
                out[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[sid]
    return out


def _read_class_file(path: str) -> tuple[list[str], dict[str, str]]:
    """Lines ``<class id>[ <name>]`` (``LOC_synset_mapping.txt``, ``classes.txt``): ids in order, and names."""
    ids: list[str] = []
    names: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(maxsplit=1)
            if parts:
                ids.append(parts[0])
                if len(parts) > 1:
                    names[parts[0]] = parts[1]
    return ids, names


def _scan_val(root: str, spec: SourceSpec, explicit: ClassMap | None) -> Scan:
    scan = Scan("ilsvrc-val", root)
    labels_path = os.path.abspath(str(spec.labels))
    if labels_path.endswith(".csv"):
        by_image = read_loc_val_solution(labels_path)
        mapping = Path(labels_path).with_name("LOC_synset_mapping.txt")
        if mapping.is_file():
            ids, names = _read_class_file(str(mapping))
            found = ClassMap(ids, names, "synset-mapping", str(mapping))
        else:
            found = ClassMap(sorted(set(by_image.values())), {}, "labels", labels_path)
    else:
        id_to_wnid, words, leaves = read_devkit_meta(str(spec.meta))
        by_image = read_devkit_ground_truth(labels_path, id_to_wnid)
        found = ClassMap(leaves, {w: words[w] for w in leaves}, "devkit-meta", os.path.abspath(str(spec.meta)))
    if explicit is not None:  # the caller's class map (e.g. train's) wins; names from either
        known = set(explicit.classes)
        names = {k: v for k, v in {**found.names, **explicit.names}.items() if k in known}
        scan.class_map = ClassMap(explicit.classes, names, explicit.source, explicit.path)
    else:
        scan.class_map = found
        if found.source == "labels" and len(found.classes) < ILSVRC_NUM_CLASSES:
            scan.warnings.append(
                f"class indices of {labels_path} come from the labels themselves: {len(found.classes)} classes, "
                f"fewer than ILSVRC-2012's {ILSVRC_NUM_CLASSES}, and no LOC_synset_mapping.txt beside it, so they "
                "differ from the indices of a train set with more classes. Give the train set's class map: "
                "--classes-from TRAIN_SHARDS (flow parameter classes_from) or --classes FILE."
            )
    scan.classes, scan.class_names = list(scan.class_map.classes), dict(scan.class_map.names)
    index = {wnid: i for i, wnid in enumerate(scan.classes)}

    def label_of(name: str) -> int | Reject:
        image_id = posixpath.splitext(posixpath.basename(name))[0]
        wnid = by_image.get(image_id)
        if wnid is None:
            return Reject(name, f"{NO_LABEL}: {image_id} is not in {os.path.basename(labels_path)}")
        if wnid not in index:
            return Reject(name, f"{UNKNOWN_CLASS}: {wnid} is not one of the {len(index)} classes")
        return index[wnid]

    if os.path.isfile(root):
        _scan_image_tar(root, scan, label_of)
    else:
        for found in _walk_root(root, scan):
            label = label_of(found.rel)
            if isinstance(label, Reject):
                scan.rejects.append(Reject(found.rel, label.reason))
            else:
                scan.items.append(_file_item(found, root, label))
    return scan


# -- classes ---------------------------------------------------------------------------------------------------


def _reindex(scan: Scan, class_map: ClassMap) -> None:
    """Re-index folder / archive labels through the given class order; a folder the map lacks is refused."""
    ids = class_map.classes
    what = f"classes file {class_map.path}" if class_map.source == "classes-file" else f"shard set {class_map.path}"
    if ids != scan.classes:
        missing = sorted(set(scan.classes) - set(ids))
        if missing:
            raise ValueError(f"{what} lacks the class folders {missing[:5]}{'...' if len(missing) > 5 else ''}")
        position = {c: i for i, c in enumerate(ids)}
        remap = {old: position[c] for old, c in enumerate(scan.classes)}
        scan.items = [
            SourceItem(it.key, it.source, remap[it.label], it.path, it.size, it.mtime, it.offset) for it in scan.items
        ]
        scan.classes = list(ids)
    known = set(scan.classes)
    scan.class_names = {k: v for k, v in {**scan.class_names, **class_map.names}.items() if k in known}
    scan.class_map = ClassMap(list(scan.classes), dict(scan.class_names), class_map.source, class_map.path)


def _find_class_names(root: Path, classes: list[str]) -> dict[str, str]:
    """Human names from a ``classes.txt`` / ``LOC_synset_mapping.txt`` / ``words.txt`` beside or above the root."""
    wanted = set(classes)
    for folder in (root if root.is_dir() else root.parent, root.parent):
        for name in ("classes.txt", "LOC_synset_mapping.txt", "words.txt"):
            candidate = folder / name
            if candidate.is_file() and candidate.stat().st_size < 64 << 20:
                _, names = _read_class_file(str(candidate))
                if wanted and wanted <= set(names):
                    return {c: names[c] for c in classes}
    return {}


def _drop_duplicate_keys(scan: Scan) -> None:
    """Two inputs mapping to one key (``a.jpg`` + ``a.png``, ``a.b.jpg`` + ``a_b.jpg``) would collide in a shard:
    keep the first by source path and reject the others."""
    first: dict[str, SourceItem] = {}
    kept: list[SourceItem] = []
    for it in sorted(scan.items, key=lambda it: it.source):
        if it.key in first:
            scan.rejects.append(Reject(it.source, f"{DUPLICATE_KEY}: key {it.key!r} already used by {first[it.key].source}"))
        else:
            first[it.key] = it
            kept.append(it)
    scan.items = kept
