"""The dino-shard flow end to end: round trip (every input back exactly once with its label, bytes identical unless
flagged re-encoded), every bad-input case in ``rejects``, idempotent re-runs, a killed run resumed, whole-input
failures before anything is written; local disk and a real SeaweedFS server. Prefect runs on its ephemeral
server (no mocks)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_model.data.manifest import MANIFEST_NAME, load_manifest
from dino_model.data.shard_writer import (
    ShardOptions,
    build_manifest,
    finish,
    plan_shards,
    write_dataset,
    write_shard,
)
from dino_model.data.sources import SourceSpec, scan_source
from dino_model.storage import StorageError, open_store
from flows.cli import main as cli_main
from flows.cli.common import parse_bytes
from flows.shard import dino_shard

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------------------------


def copy_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy2(f, dst / class_dir.name / f.name)
    return dst


def read_shards(dest: str) -> dict[str, dict]:
    """Every sample of every shard listed in the manifest: key -> {jpg, cls, json, shard}; asserts keys are unique."""
    store = open_store(dest)
    manifest = load_manifest(store)
    samples: dict[str, dict] = {}
    for entry in manifest.shards:
        data = store.get_bytes(entry.name)
        assert len(data) == entry.bytes
        members: dict[str, dict] = defaultdict(dict)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                members[key][ext] = tf.extractfile(m).read()
        assert len(members) == entry.samples
        for key, parts in members.items():
            assert set(parts) == {"jpg", "cls", "json"}, key
            assert key not in samples, f"{key} appears twice"
            samples[key] = {**parts, "meta": json.loads(parts["json"]), "shard": entry.name}
    return samples


def check_round_trip(dest: str, root: Path) -> tuple[dict, object]:
    """Every accepted input comes back once with its label; bytes equal unless flagged re-encoded."""
    manifest = load_manifest(dest)
    samples = read_shards(dest)
    rejected = {r.path for r in manifest.rejects}
    t = manifest.totals
    assert t["found"] == t["accepted"] + t["rejected"]
    assert t["accepted"] == len(samples) == sum(s.samples for s in manifest.shards)
    by_source = {s["meta"]["source"]: s for s in samples.values()}
    assert len(by_source) == len(samples)
    for source, s in by_source.items():
        assert source not in rejected
        class_dir = source.split("/")[0]
        assert int(s["cls"]) == manifest.classes.index(class_dir)
        assert s["meta"]["class_id"] == class_dir
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode in ("RGB", "L")
        assert (s["meta"]["width"], s["meta"]["height"]) == img.size
        original = (root / source).read_bytes()
        if s["meta"]["reencoded"]:
            assert s["meta"]["quality"] == manifest.options["quality"] and img.mode == "RGB"
        else:
            assert s["jpg"] == original and s["meta"]["quality"] is None
    return by_source, manifest


def jpeg_of(mode: str, size=(40, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def png_of(mode: str, size=(40, 30)) -> bytes:
    img = Image.new("RGBA", size, (200, 20, 20, 128)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def add_bad_inputs(root: Path) -> dict[str, str]:
    """Add every bad-input case to an ImageFolder copy; returns the expected reject path -> reason category."""
    a, b = sorted(p for p in root.iterdir() if p.is_dir())[:2]
    good = next(a.iterdir()).read_bytes()
    (a / "corrupt.JPEG").write_bytes(good[:3] + bytes(range(256)) * 8)
    (a / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (a / "zero.JPEG").write_bytes(b"")
    (b / "notes.JPEG").write_text("not an image at all\n" * 20)
    (b / "dangling.JPEG").symlink_to(root / "nowhere.JPEG")
    (root / "n99999999").mkdir()
    (b / "dup.JPEG").write_bytes(good)
    (b / "dup.png").write_bytes(png_of("RGB"))
    big = Image.new("L", (1500, 1400))
    big.save(b / "bomb.png")  # 2.1 MP: a bomb under this test's max_pixels of 2 MP
    # converted, not rejected:
    (a / "cmyk.JPEG").write_bytes(jpeg_of("CMYK"))
    (a / "grey.JPEG").write_bytes(jpeg_of("L"))
    (b / "alpha.png").write_bytes(png_of("RGBA"))
    (b / "greyalpha.png").write_bytes(png_of("LA"))
    return {
        f"{a.name}/corrupt.JPEG": "corrupt",
        f"{a.name}/truncated.JPEG": "truncated",
        f"{a.name}/zero.JPEG": "zero-byte",
        f"{b.name}/notes.JPEG": "not-an-image",
        f"{b.name}/dangling.JPEG": "unreadable",
        "n99999999": "empty-class-folder",
        f"{b.name}/dup.png": "duplicate-key",
        f"{b.name}/bomb.png": "decompression-bomb",
    }


def tar_state(dest: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in dest.iterdir()}


# -- the writer library alone (fast, no Prefect) ----------------------------------------------------------------


def test_plan_mixes_classes_and_respects_limits(shared_data):
    scan = scan_source(SourceSpec(str(shared_data / "imagenette-128" / "train")))
    plans = plan_shards(scan.items, ShardOptions(shard_size=500), scan.classes)
    assert [len(p.items) for p in plans] == [500] * 12
    for p in plans:
        assert len({it.label for it in p.items}) == 10  # every shard mixes all classes
    by_bytes = plan_shards(scan.items, ShardOptions(shard_size=None, shard_bytes=3_000_000), scan.classes)
    assert all(sum(it.size for it in p.items) <= 3_000_000 for p in by_bytes)
    assert sum(len(p.items) for p in by_bytes) == 6000
    both = plan_shards(scan.items, ShardOptions(shard_size=100, shard_bytes=3_000_000), scan.classes)
    assert len(both) == 60
    other_seed = plan_shards(scan.items, ShardOptions(shard_size=500, seed=1), scan.classes)
    assert [it.key for it in other_seed[0].items] != [it.key for it in plans[0].items]
    with pytest.raises(ValueError, match="shard_size"):
        ShardOptions(shard_size=0)
    with pytest.raises(ValueError, match="name"):
        ShardOptions(name="a.b")


def test_writer_is_deterministic_and_resumes(tmp_path, shared_data):
    root = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=3, per_class=20)
    (root / sorted(os.listdir(root))[0] / "x.png").write_bytes(png_of("RGBA"))
    scan = scan_source(SourceSpec(str(root)))
    options = ShardOptions(name="t", shard_size=7, quality=90)
    first = write_dataset(scan, str(tmp_path / "a"), options, workers=2)
    second = write_dataset(scan, str(tmp_path / "b"), options, workers=1)
    assert first.written == second.written == 9 and first.reencoded == 1
    a, b = load_manifest(str(tmp_path / "a")), load_manifest(str(tmp_path / "b"))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    for s in a.shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()

    # "Killed" after three shards: only their tars and progress records exist, no manifest.
    store = open_store(str(tmp_path / "c"))
    plans = plan_shards(scan.items, options, scan.classes, scan.class_names)
    for plan in plans[:3]:
        write_shard(store, plan, options, scan.classes, scan.class_names)
    assert not store.exists(MANIFEST_NAME)
    resumed = write_dataset(scan, store, options)
    assert (resumed.skipped, resumed.written) == (3, 6)
    c = load_manifest(store)
    assert replace(c, created="") == replace(a, created="")
    assert not (tmp_path / "c" / "_progress").exists()

    # A tampered shard is rewritten, not trusted.
    (tmp_path / "c" / plans[4].name).write_bytes(b"garbage")
    again = write_dataset(scan, store, options)
    assert (again.written, again.manifest_written) == (1, False)
    assert (tmp_path / "c" / plans[4].name).read_bytes() == (tmp_path / "a" / plans[4].name).read_bytes()

    # A new plan with fewer shards removes the stale ones.
    fewer = write_dataset(scan, store, replace(options, shard_size=30))
    assert fewer.shards == 3
    assert sorted(o.key for o in store.list("t-")) == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]


def test_build_manifest_checks_bookkeeping(tmp_path, shared_data):
    root = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=1, per_class=3)
    scan = scan_source(SourceSpec(str(root)))
    options = ShardOptions(shard_size=2)
    plans = plan_shards(scan.items, options, scan.classes)
    store = open_store(str(tmp_path / "d"))
    outcomes = [write_shard(store, p, options, scan.classes) for p in plans]
    manifest = build_manifest(scan, plans, outcomes, options)
    assert manifest.totals["found"] == 3
    with pytest.raises(ValueError):
        build_manifest(scan, plans, outcomes[:1], options)
    assert finish(store, manifest, None) is True
    assert finish(store, load_manifest(store), load_manifest(store)) is False


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_shard_set_files_get_the_mode_open_gives(tmp_path, shared_data, mask):
    """Shards and manifest.json are readable by whoever the umask allows (another uid, a pod), not 0600."""
    root = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=2, per_class=3)
    old = os.umask(mask)
    try:
        write_dataset(scan_source(SourceSpec(str(root))), str(tmp_path / "shards"), ShardOptions(shard_size=4))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "shards").iterdir()}
    assert modes == {"train-000000.tar": oct(0o666 & ~mask), "train-000001.tar": oct(0o666 & ~mask),
                     MANIFEST_NAME: oct(0o666 & ~mask)}


def test_parse_bytes():
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("4096") == 4096
    with pytest.raises(Exception):
        parse_bytes("lots")


# -- the flow --------------------------------------------------------------------------------------------------


def test_flow_round_trip_bad_inputs_and_idempotent_rerun(tmp_path, shared_data):
    root = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=4, per_class=15)
    expected_rejects = add_bad_inputs(root)
    dest = tmp_path / "shards"
    params = dict(source=str(root), destination=str(dest),
                  shards={"name": "train", "shard_size": 16, "seed": 3, "max_pixels": 2_000_000},
                  runner={"parallelism": 3})
    summary = dino_shard(**params)
    by_source, manifest = check_round_trip(str(dest), root)

    assert {r.path: r.reason.split(":")[0] for r in manifest.rejects} == expected_rejects
    assert all(r.reason.split(":", 1)[1].strip() or r.reason for r in manifest.rejects)
    # 60 images + dup.JPEG + 4 converted ones accepted; 8 rejected (the empty class folder counts as an input).
    assert (summary.accepted, summary.rejected, summary.found) == (65, 8, 73)
    assert manifest.classes == sorted(os.listdir(root))  # the empty class keeps its index, like ImageFolder
    reencoded = {s for s, v in by_source.items() if v["meta"]["reencoded"]}
    assert {s.split("/")[1] for s in reencoded} == {"cmyk.JPEG", "alpha.png", "greyalpha.png"}
    assert summary.reencoded == 3 == manifest.totals["reencoded"]
    grey = next(v for s, v in by_source.items() if s.endswith("grey.JPEG"))
    assert not grey["meta"]["reencoded"]  # greyscale JPEG kept byte-for-byte
    shard_classes = [{v["cls"] for v in by_source.values() if v["shard"] == s.name} for s in manifest.shards]
    assert all(len(c) > 1 for c in shard_classes)  # shuffled across shards
    assert summary.written == len(manifest.shards) == 5 and summary.manifest_written

    from prefect.artifacts import Artifact

    summary_md = Artifact.get("dino-shard-train-summary")
    assert "found 73 = accepted 65 + rejected 8" in summary_md.data and "decompression-bomb" in summary_md.data
    assert float(Artifact.get("dino-shard-train-progress").data) == 100.0

    before = tar_state(dest)
    again = dino_shard(**params)
    assert (again.written, again.skipped, again.manifest_written) == (0, 5, False)
    assert tar_state(dest) == before  # nothing rewritten, not even the manifest


def test_flow_to_seaweedfs_real_resolution(s3_bucket, shared_data, tmp_path):
    root = shared_data / "imagenet-sample"
    dest = f"{s3_bucket}/imagenet-sample"
    summary = dino_shard(source=str(root), destination=dest, shards={"shard_size": 16})
    assert (summary.accepted, summary.rejected, summary.shards) == (40, 0, 3)
    by_source, manifest = check_round_trip(dest, root)
    assert max(v["meta"]["width"] for v in by_source.values()) >= 500  # real resolution, untouched
    store = open_store(dest)
    listing = {o.key: o.size for o in store.list()}
    assert set(listing) == {MANIFEST_NAME, *(s.name for s in manifest.shards)}  # no progress records left
    again = dino_shard(source=str(root), destination=dest, shards={"shard_size": 16})
    assert (again.written, again.manifest_written) == (0, False)
    assert {o.key: o.size for o in store.list()} == listing


def test_flow_ilsvrc_train_and_val_share_class_indices(tmp_path):
    from tests.test_sources import SORTED, make_train_tar, make_val, write_devkit

    tar = tmp_path / "ILSVRC2012_img_train.tar"
    make_train_tar(tar, per_class=4)
    truth = make_val(tmp_path / "val", n=6)
    gt, meta = write_devkit(tmp_path / "devkit", truth)
    train = dino_shard(source=str(tar), destination=str(tmp_path / "out" / "train"), shards={"shard_size": 5})
    val = dino_shard(source=str(tmp_path / "val"), destination=str(tmp_path / "out" / "val"), labels=str(gt),
                     meta=str(meta), shards={"shard_size": 5})
    assert (train.accepted, val.accepted) == (12, 6)
    assert load_manifest(str(tmp_path / "out" / "train")).classes == SORTED
    assert load_manifest(str(tmp_path / "out" / "val")).classes == SORTED
    assert load_manifest(str(tmp_path / "out" / "train")).name == "ILSVRC2012_img_train"
    for key, s in read_shards(str(tmp_path / "out" / "val")).items():
        assert SORTED[int(s["cls"])] == truth[key] == s["meta"]["class_id"]
    for key, s in read_shards(str(tmp_path / "out" / "train")).items():
        assert SORTED[int(s["cls"])] == key.split("_")[0]


def test_whole_input_failures_write_nothing(tmp_path, s3_bucket, monkeypatch):
    src = tmp_path / "src"
    (src / "cls").mkdir(parents=True)
    (src / "cls" / "a.txt").write_text("no image here")
    dest = tmp_path / "dest"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dino_shard(source=str(tmp_path / "missing"), destination=str(dest))
    with pytest.raises(ValueError, match="no images"):
        dino_shard(source=str(src), destination=str(dest))
    with pytest.raises(ValueError, match="scheme"):
        dino_shard(source=str(src), destination="ftp://host/x")
    (src / "cls" / "b.jpg").write_bytes(jpeg_of("RGB"))  # from here on the input is fine, the destination is not
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        dino_shard(source=str(src), destination=str(tmp_path / "file" / "under-a-file"))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret[:4])
    with pytest.raises(StorageError, match="denied") as err:
        dino_shard(source=str(src), destination=f"{s3_bucket}/x")
    assert secret[:8] not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert not dest.exists()
    assert list(open_store(s3_bucket).list()) == []
    # CLI: a clear one-line error and exit status 2, before Prefect even starts.
    assert cli_main(["shard", str(tmp_path / "missing"), str(dest)]) == 2


@pytest.mark.slow
def test_cli_killed_midway_then_resumed(tmp_path, shared_data):
    root = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=10, per_class=20)
    dest = tmp_path / "shards"
    args = [str(root), str(dest), "--shard-size", "10", "--parallelism", "1", "--seed", "7", "--no-progress"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "shard", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Kill once the first shard is complete (its tar and its progress record are both there).
        while not list(dest.glob("_progress/src-*.tar.json")):  # (the glob skips hidden temp files)
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI's own process group (it and its ephemeral server)
        proc.wait()
    tars = [p for p in dest.iterdir() if p.suffix == ".tar"]
    assert not (dest / MANIFEST_NAME).exists() and 1 <= len(tars) < 20, "the run was not killed midway"

    resumed = dino_shard(source=str(root), destination=str(dest), shards={"shard_size": 10, "seed": 7},
                         runner={"parallelism": 2})
    assert resumed.skipped >= 1 and resumed.written + resumed.skipped == 20
    # The same manifest as an uninterrupted run (here through the library path, which must agree with the flow).
    write_dataset(scan_source(SourceSpec(str(root))), str(tmp_path / "clean"), ShardOptions("src", 10, seed=7))
    a, b = load_manifest(str(dest)), load_manifest(str(tmp_path / "clean"))
    assert replace(a, created="") == replace(b, created="")
    assert (resumed.accepted, resumed.rejected) == (200, 0)


def test_synthetic_dataset_is_deterministic_and_shards_cleanly(tmp_path):
    from dino_model.data.synthetic import make_synthetic_imagefolder

    info = make_synthetic_imagefolder(tmp_path / "a", classes=4, per_class=10, size=64, seed=1)
    make_synthetic_imagefolder(tmp_path / "b", classes=4, per_class=10, size=64, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert info["images"] == 40 and info["png"] == 4
    scan = scan_source(SourceSpec(str(tmp_path / "a")))
    summary = write_dataset(scan, str(tmp_path / "shards"), ShardOptions("demo", 16))
    assert (summary.found, summary.accepted, summary.rejected, summary.reencoded) == (40, 40, 0, 4)
    assert load_manifest(str(tmp_path / "shards")).class_names["circle"] == "circle shape"
