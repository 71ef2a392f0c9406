"""Input scanners: ImageFolder trees, the official ILSVRC-2012 layout (built synthetically here: a train tar of
per-class tars, val images with LOC_val_solution.csv or devkit ground truth + meta.mat), flat folders."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_model.data.sources import (
    DUPLICATE_KEY,
    EMPTY_CLASS,
    NO_CLASS_FOLDER,
    NO_LABEL,
    UNSAFE_PATH,
    SourceSpec,
    detect_kind,
    make_key,
    require_images,
    scan_source,
)

# Devkit-style numbering on purpose NOT in WNID order: labels must go through the WNID, never this number.
WNIDS = {3: "n01440764", 1: "n02102040", 2: "n02979186"}
SORTED = sorted(WNIDS.values())


def jpeg_bytes(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    tf.addfile(info, io.BytesIO(data))


def make_train_tar(path: Path, per_class: int = 3, extra_members: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """An ILSVRC2012_img_train.tar look-alike: ``<wnid>.tar`` members each holding ``<wnid>_<n>.JPEG``."""
    images: dict[str, bytes] = {}
    with tarfile.open(path, "w") as outer:
        for wnid in SORTED:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for n in range(per_class):
                    data = jpeg_bytes(hash((wnid, n)) % 2**32)
                    _add(inner, f"{wnid}_{n}.JPEG", data)
                    images[f"{wnid}_{n}"] = data
                for name, data in (extra_members or {}).items():
                    if name.startswith(wnid):
                        _add(inner, name, data)
            _add(outer, f"{wnid}.tar", buf.getvalue())
    return images


def make_val(folder: Path, n: int = 6) -> dict[str, str]:
    """``ILSVRC2012_val_000000NN.JPEG`` images; returns image id -> true WNID."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(1, n + 1):
        image_id = f"ILSVRC2012_val_{i:08d}"
        (folder / f"{image_id}.JPEG").write_bytes(jpeg_bytes(1000 + i))
        truth[image_id] = list(WNIDS.values())[i % 3]
    return truth


def write_loc_csv(path: Path, truth: dict[str, str]) -> None:
    lines = ["ImageId,PredictionString"]
    lines += [f"{k},{w} 10 20 30 40 {w} 1 2 3 4" for k, w in truth.items()]
    path.write_text("\n".join(lines) + "\n")


def write_devkit(folder: Path, truth: dict[str, str]) -> tuple[Path, Path]:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    id_of = {w: i for i, w in WNIDS.items()}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, f"words for {w}", 0) for i, w in sorted(WNIDS.items())]
    rows.append((1001, "n00001740", "entity", 3))  # an inner node of the hierarchy: not a class
    synsets = np.array(rows, dtype=dtype).reshape(-1, 1)
    meta = folder / "meta.mat"
    savemat(meta, {"synsets": synsets})
    gt = folder / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{id_of[truth[k]]}\n" for k in sorted(truth)))
    return gt, meta


def test_imagefolder_scan(shared_data):
    scan = scan_source(SourceSpec(str(shared_data / "imagenette-128" / "train")))
    assert scan.kind == "imagefolder"
    assert len(scan.items) == 6000 and not scan.rejects
    assert scan.classes == sorted(scan.classes) and len(scan.classes) == 10
    assert scan.class_names["n01440764"] == "tench"  # from ../classes.txt
    item = next(it for it in scan.items if it.source.startswith("n03028079/"))
    assert scan.classes[item.label] == "n03028079"
    assert "." not in item.key and item.key.startswith("n03028079_")
    assert item.read() == Path(item.path).read_bytes()
    assert [it.key for it in scan.items] == sorted(it.key for it in scan.items)
    require_images(scan)


def test_make_key_has_no_dots():
    assert make_key("n01/n01_1.JPEG") == "n01_n01_1"
    assert make_key("a b/c.d.e.png") == "a_b_c_d_e"
    assert make_key("noext") == "noext"


def test_bad_entries_rejected_at_scan(tmp_path):
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "empty").mkdir()
    (root / "cat" / "a.jpg").write_bytes(jpeg_bytes(1))
    (root / "cat" / "a.png").write_bytes(jpeg_bytes(2))  # same key as a.jpg
    (root / "cat" / "b.c.jpg").write_bytes(jpeg_bytes(3))
    (root / "cat" / "b_c.jpg").write_bytes(jpeg_bytes(4))  # same key as b.c.jpg once dots go
    (root / "dog" / "a.jpg").write_bytes(jpeg_bytes(5))  # same file name, other class: a different key
    (root / "dog" / "sub").mkdir()
    (root / "dog" / "sub" / "deep.jpg").write_bytes(jpeg_bytes(6))
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")  # unreadable: dangling link
    os.mkfifo(root / "dog" / "pipe.jpg")  # unreadable: not a regular file
    (root / "dog" / ".DS_Store").write_bytes(b"junk")  # hidden: not an input
    (root / "stray.jpg").write_bytes(jpeg_bytes(7))
    (root / "classes.txt").write_text("cat a cat\ndog a dog\n")  # not an input: ignored
    scan = scan_source(SourceSpec(str(root)))
    assert scan.classes == ["cat", "dog", "empty"]
    reasons = {r.path: r.reason.split(":")[0] for r in scan.rejects}
    assert reasons == {
        "cat/a.png": DUPLICATE_KEY,
        "cat/b_c.jpg": DUPLICATE_KEY,
        "dog/gone.jpg": "unreadable",
        "dog/pipe.jpg": "unreadable",
        "empty": EMPTY_CLASS,
        "stray.jpg": NO_CLASS_FOLDER,
    }
    assert sorted(it.source for it in scan.items) == ["cat/a.jpg", "cat/b.c.jpg", "dog/a.jpg", "dog/sub/deep.jpg"]
    assert {it.source: it.label for it in scan.items}["dog/sub/deep.jpg"] == 1
    assert scan.found == 10


def test_flat_folder_unlabelled(tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(jpeg_bytes(i))
    scan = scan_source(SourceSpec(str(tmp_path)))
    assert scan.kind == "flat" and scan.classes == []
    assert [it.label for it in scan.items] == [-1, -1, -1]


def test_whole_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_source(SourceSpec(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="kind"):
        SourceSpec(str(tmp_path), kind="zip")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        require_images(scan_source(SourceSpec(str(tmp_path))))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        require_images(scan_source(SourceSpec(str(empty), kind="flat")))


def test_ilsvrc_train_tar_read_in_place(tmp_path):
    tar = tmp_path / "ILSVRC2012_img_train.tar"
    images = make_train_tar(tar, extra_members={f"{SORTED[0]}_x/../../evil.JPEG": b"x"})
    assert detect_kind(SourceSpec(str(tar))) == "ilsvrc-train"
    before = set(os.listdir(tmp_path))
    scan = scan_source(SourceSpec(str(tar)))
    assert set(os.listdir(tmp_path)) == before  # nothing extracted
    assert scan.kind == "ilsvrc-train" and scan.classes == SORTED
    assert len(scan.items) == len(images) == 9
    for it in scan.items:
        stem = it.source.rsplit("/", 1)[1].removesuffix(".JPEG")
        assert it.read() == images[stem]  # byte range inside the outer tar
        assert scan.classes[it.label] == stem.split("_")[0]
        assert it.key == f"{stem.split('_')[0]}_{stem}"
    assert [r.reason.split(":")[0] for r in scan.rejects] == [UNSAFE_PATH]


def test_ilsvrc_train_keys_match_extracted_imagefolder(tmp_path):
    tar = tmp_path / "train.tar"
    images = make_train_tar(tar, per_class=2)
    tree = tmp_path / "tree"
    for stem, data in images.items():
        (tree / stem.split("_")[0]).mkdir(parents=True, exist_ok=True)
        (tree / stem.split("_")[0] / f"{stem}.JPEG").write_bytes(data)
    a = scan_source(SourceSpec(str(tar)))
    b = scan_source(SourceSpec(str(tree)))
    assert [(i.key, i.label) for i in a.items] == [(i.key, i.label) for i in b.items]


def test_ilsvrc_val_with_loc_csv(tmp_path):
    truth = make_val(tmp_path / "val")
    del truth["ILSVRC2012_val_00000006"]  # an image without a label
    csv = tmp_path / "LOC_val_solution.csv"
    write_loc_csv(csv, truth)
    scan = scan_source(SourceSpec(str(tmp_path / "val"), labels=str(csv)))
    assert scan.kind == "ilsvrc-val" and scan.classes == SORTED
    for it in scan.items:
        assert scan.classes[it.label] == truth[it.key]
    assert [(r.path, r.reason.split(":")[0]) for r in scan.rejects] == [("ILSVRC2012_val_00000006.JPEG", NO_LABEL)]


def test_ilsvrc_val_devkit_maps_through_wnid(tmp_path):
    truth = make_val(tmp_path / "val")
    gt, meta = write_devkit(tmp_path / "devkit", truth)
    scan = scan_source(SourceSpec(str(tmp_path / "val"), labels=str(gt), meta=str(meta)))
    assert scan.classes == SORTED  # leaves only, sorted: the train indices
    assert len(scan.items) == 6 and not scan.rejects
    for it in scan.items:
        assert scan.classes[it.label] == truth[it.key]
        devkit_id = {w: i for i, w in WNIDS.items()}[truth[it.key]]
        if devkit_id - 1 != it.label:
            break
    else:
        pytest.fail("test data must make the devkit numbering differ from the sorted-WNID index")
    assert scan.class_names["n01440764"] == "words for n01440764"


def test_ilsvrc_val_from_tar_and_devkit_needs_meta(tmp_path):
    truth = make_val(tmp_path / "val", n=4)
    val_tar = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(val_tar, "w") as tf:
        for p in sorted((tmp_path / "val").iterdir()):
            tf.add(p, arcname=p.name)
    shutil.rmtree(tmp_path / "val")
    csv = tmp_path / "LOC_val_solution.csv"
    write_loc_csv(csv, truth)
    scan = scan_source(SourceSpec(str(val_tar), labels=str(csv)))
    assert sorted(it.key for it in scan.items) == sorted(truth)
    assert all(scan.classes[it.label] == truth[it.key] for it in scan.items)
    gt = tmp_path / "gt.txt"
    gt.write_text("1\n")
    with pytest.raises(FileNotFoundError, match="meta"):
        scan_source(SourceSpec(str(val_tar), labels=str(gt)))


def test_class_file_aligns_val_to_train_order(tmp_path):
    truth = make_val(tmp_path / "val")
    csv = tmp_path / "LOC_val_solution.csv"
    write_loc_csv(csv, truth)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{w} name-{w}\n" for w in ["n00000001", *SORTED]))  # train had an extra class
    scan = scan_source(SourceSpec(str(tmp_path / "val"), labels=str(csv), classes=str(classes)))
    assert scan.classes == ["n00000001", *SORTED]
    assert all(scan.classes[it.label] == truth[it.key] for it in scan.items)
    assert scan.class_names[SORTED[0]] == f"name-{SORTED[0]}"
