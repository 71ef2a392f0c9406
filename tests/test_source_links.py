"""Symbolic links in a source tree never relabel an image: each image is labelled only by the class folder it
really lies in; loops and links out of a class folder are rejected once, with a reason, and not followed; the same
real file reached twice is stored once. For the ImageFolder, flat and ILSVRC-val layouts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dino_model.data.images import UNREADABLE
from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.manifest import load_manifest
from dino_model.data.sources import EMPTY_CLASS, SourceSpec, scan_source
from dino_model.data.tree_walk import DUPLICATE_FILE, DUPLICATE_FOLDER, LINK_LEAVES_CLASS, SYMLINK_LOOP
from tests.test_sources import jpeg_bytes, make_val, write_loc_csv


def reasons(scan) -> dict[str, str]:
    paths = [r.path for r in scan.rejects]
    assert len(paths) == len(set(paths)), f"an entry was rejected twice: {Counter(paths).most_common(3)}"
    return {r.path: r.reason.split(":")[0] for r in scan.rejects}


def labelled(scan) -> dict[str, str]:
    return {it.source: scan.classes[it.label] if it.label >= 0 else None for it in scan.items}


def make_tree(root: Path) -> None:
    """cat/{c1,c2}.jpg, cat/sub/c3.jpg, dog/{d1,d2}.jpg."""
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    for i, rel in enumerate(["cat/c1.jpg", "cat/c2.jpg", "cat/sub/c3.jpg", "dog/d1.jpg", "dog/d2.jpg"]):
        (root / rel).write_bytes(jpeg_bytes(i))


def test_the_reported_loop_no_longer_relabels_and_a_dangling_link_is_one_reject(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    (root / "cat" / "up_loop").symlink_to("..")
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    scan = scan_source(SourceSpec(str(root)))
    assert labelled(scan) == {"cat/c1.jpg": "cat", "cat/c2.jpg": "cat", "cat/sub/c3.jpg": "cat",
                              "dog/d1.jpg": "dog", "dog/d2.jpg": "dog"}
    assert reasons(scan) == {"cat/up_loop": SYMLINK_LOOP, "dog/gone.jpg": UNREADABLE}
    assert scan.found == 7


def test_imagefolder_links_decided_by_real_path(tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    outside = tmp_path / "store"
    (outside / "more_cats").mkdir(parents=True)
    (outside / "more_cats" / "m1.jpg").write_bytes(jpeg_bytes(10))
    (outside / "shared.jpg").write_bytes(jpeg_bytes(11))
    (outside / "lynx").mkdir()
    (outside / "lynx" / "l1.jpg").write_bytes(jpeg_bytes(12))
    (root / "readme.txt").write_text("not an input")
    cat, dog = root / "cat", root / "dog"
    (cat / "dog_image.jpg").symlink_to("../dog/d1.jpg")  # a dog filed under cat: would relabel it
    (cat / "dogs").symlink_to("../dog")  # a whole class under another one
    (cat / "notes.txt").symlink_to("../readme.txt")  # inside the dataset, outside the class folder
    (cat / "up2").symlink_to("../..")  # contains the dataset
    (cat / "again.jpg").symlink_to("c1.jpg")  # the same real file twice: c1.jpg (no link) is kept
    (cat / "sub_alias").symlink_to("sub")  # the same folder twice
    (cat / "deep").mkdir()
    (cat / "deep" / "back").symlink_to("..")  # a loop inside the class folder
    (cat / "ext").symlink_to(outside / "more_cats")  # outside the dataset: followed, labelled cat
    (cat / "ext.jpg").symlink_to(outside / "shared.jpg")
    (dog / "ext.jpg").symlink_to(outside / "shared.jpg")  # the same outside file again, under dog
    (dog / "a").symlink_to("b")  # a cycle of links
    (dog / "b").symlink_to("a")
    (root / "cats").symlink_to("cat")  # a class folder linked to another class folder
    (root / "lynx").symlink_to(outside / "lynx")  # a class folder linked from outside: a class of its own
    scan = scan_source(SourceSpec(str(root)))
    assert scan.classes == ["cat", "cats", "dog", "lynx"]
    assert labelled(scan) == {
        "cat/c1.jpg": "cat", "cat/c2.jpg": "cat", "cat/sub/c3.jpg": "cat", "cat/ext/m1.jpg": "cat",
        "cat/ext.jpg": "cat", "dog/d1.jpg": "dog", "dog/d2.jpg": "dog", "lynx/l1.jpg": "lynx",
    }
    got = reasons(scan)
    assert got == {
        "cat/dog_image.jpg": LINK_LEAVES_CLASS,
        "cat/dogs": LINK_LEAVES_CLASS,
        "cat/notes.txt": LINK_LEAVES_CLASS,
        "cat/up2": SYMLINK_LOOP,
        "cat/deep/back": SYMLINK_LOOP,
        "cat/again.jpg": DUPLICATE_FILE,
        "cat/sub_alias": DUPLICATE_FOLDER,
        "dog/ext.jpg": DUPLICATE_FILE,
        "dog/a": UNREADABLE,
        "dog/b": UNREADABLE,
        "cats": DUPLICATE_FOLDER,
    }
    by_path = {r.path: r.reason for r in scan.rejects}
    assert "inside class folder 'dog'" in by_path["cat/dog_image.jpg"]
    assert "same file as 'cat/c1.jpg'" in by_path["cat/again.jpg"]
    assert "same file as 'cat/ext.jpg'" in by_path["dog/ext.jpg"]
    assert "broken link" in by_path["dog/a"]
    assert scan.found == len(scan.items) + len(scan.rejects) == 8 + 11


def test_flat_links(tmp_path):
    root = tmp_path / "flat"
    (root / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.jpg", "b.jpg", "sub/c.jpg"]):
        (root / rel).write_bytes(jpeg_bytes(i))
    outside = tmp_path / "store"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(jpeg_bytes(9))
    (root / "up").symlink_to("..")  # contains the dataset
    (root / "sub" / "back").symlink_to("..")  # the dataset root itself
    (root / "again.jpg").symlink_to("a.jpg")
    (root / "sub_alias").symlink_to("sub")
    (root / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "x.jpg").symlink_to(outside / "x.jpg")  # outside the dataset: kept
    scan = scan_source(SourceSpec(str(root), kind="flat"))
    assert sorted(labelled(scan)) == ["a.jpg", "b.jpg", "sub/c.jpg", "x.jpg"]
    assert reasons(scan) == {"up": SYMLINK_LOOP, "sub/back": SYMLINK_LOOP, "again.jpg": DUPLICATE_FILE,
                             "sub_alias": DUPLICATE_FOLDER, "gone.jpg": UNREADABLE}
    assert scan.found == 9


def test_ilsvrc_val_links(tmp_path):
    truth = make_val(tmp_path / "val", n=4)
    val = tmp_path / "val"
    truth["ILSVRC2012_val_00000005"] = truth["ILSVRC2012_val_00000002"]
    truth["ILSVRC2012_val_00000006"] = truth["ILSVRC2012_val_00000003"]
    truth["ILSVRC2012_val_00000007"] = truth["ILSVRC2012_val_00000001"]
    csv = tmp_path / "LOC_val_solution.csv"
    write_loc_csv(csv, truth)
    (val / "ILSVRC2012_val_00000005.JPEG").symlink_to("ILSVRC2012_val_00000001.JPEG")  # same file, other label
    (val / "ILSVRC2012_val_00000006.JPEG").symlink_to(tmp_path / "missing.JPEG")
    (val / "up_loop").symlink_to("..")
    (val / "self").symlink_to(".")
    outside = tmp_path / "store"
    outside.mkdir()
    (outside / "img.JPEG").write_bytes(jpeg_bytes(77))
    (val / "ILSVRC2012_val_00000007.JPEG").symlink_to(outside / "img.JPEG")  # labelled by its name in the csv
    scan = scan_source(SourceSpec(str(val), labels=str(csv)))
    assert {it.key: scan.classes[it.label] for it in scan.items} == {
        k: truth[k] for k in ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002", "ILSVRC2012_val_00000003",
                              "ILSVRC2012_val_00000004", "ILSVRC2012_val_00000007"]}
    assert reasons(scan) == {"ILSVRC2012_val_00000005.JPEG": DUPLICATE_FILE, "ILSVRC2012_val_00000006.JPEG": UNREADABLE,
                             "up_loop": SYMLINK_LOOP, "self": SYMLINK_LOOP}
    assert scan.found == 9


def test_linked_tree_shards_with_honest_totals(tmp_path):
    """The reported case end to end: the manifest's totals add up and every stored label is the real folder's."""
    root = tmp_path / "tree"
    make_tree(root)
    (root / "cat" / "up_loop").symlink_to("..")
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (root / "dog" / "d1_again.jpg").symlink_to("d1.jpg")
    scan = scan_source(SourceSpec(str(root)))
    summary = write_dataset(scan, str(tmp_path / "shards"), ShardOptions(name="t", shard_size=3), workers=1)
    assert (summary.found, summary.accepted, summary.rejected) == (8, 5, 3)
    manifest = load_manifest(str(tmp_path / "shards"))
    assert sorted((r.path, r.reason.split(":")[0]) for r in manifest.rejects) == [
        ("cat/up_loop", SYMLINK_LOOP), ("dog/d1_again.jpg", DUPLICATE_FILE), ("dog/gone.jpg", UNREADABLE)]
    assert os.path.isdir(root / "cat" / "up_loop" / "dog")  # the loop is still there; it is just not followed
