"""Training reader: DDP splitting, deterministic order, exact resume, resampled mode, S3, ImageFolder, raw bytes.

Shards are written here in the documented format (``<key>.jpg`` / ``.cls`` / ``.json`` + ``manifest.json``) with
tiny 32 px JPEGs, so every test is small and independent of the shard writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from dino_model.config import CropsConfig
from dino_model.data.augment import MultiCropAugmentation
from dino_model.data.manifest import Manifest, ShardEntry, save_manifest
from dino_model.data.reader import LoaderSettings, build_loader, decode_image, epoch_length, plan_epoch
from dino_model.data.image_folder import Unit
from dino_model.storage import open_store

# torchvision 0.29 deprecates its codecs (still the decoder used); the reader silences this outside pytest
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CLASSES = ["n001", "n002", "n003"]
TINY = CropsConfig(global_size=32, local_size=16, n_local=2)


def jpeg(index: int, size: int = 32, grey: bool = False) -> bytes:
    g = torch.Generator().manual_seed(index)
    px = torch.randint(0, 256, (size, size, 1 if grey else 3), dtype=torch.uint8, generator=g)
    im = Image.fromarray(px.squeeze(-1).numpy() if grey else px.numpy(), mode="L" if grey else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shards(uri: str, sizes: list[int], manifest_sizes: list[int] | None = None) -> dict[str, tuple[bytes, int]]:
    """Shards ``train-NNNNNN.tar`` of ``sizes`` samples at ``uri`` plus the manifest; returns key -> (jpeg, label)."""
    store = open_store(uri)
    samples: dict[str, tuple[bytes, int]] = {}
    entries = []
    index = 0
    for s, n in enumerate(sizes):
        members = []
        for _ in range(n):
            key, label = f"img{index:05d}", index % len(CLASSES)
            data = jpeg(index, grey=index % 5 == 0)
            meta = {"class_id": CLASSES[label], "class_name": None, "source": f"{key}.JPEG", "width": 32,
                    "height": 32, "reencoded": False, "quality": None}
            members += [(f"{key}.jpg", data), (f"{key}.cls", str(label).encode()), (f"{key}.json", json.dumps(meta).encode())]
            samples[key] = (data, label)
            index += 1
        blob = tar_bytes(members)
        name = f"train-{s:06d}.tar"
        store.put_bytes(name, blob)
        entries.append(ShardEntry(name, (manifest_sizes or sizes)[s], len(blob), hashlib.sha256(blob).hexdigest()))
    save_manifest(store, Manifest(name="train", shards=entries, classes=CLASSES,
                                  totals={"samples": sum(sizes), "accepted": sum(sizes), "found": sum(sizes)}))
    return samples


def run(loader) -> list[dict]:
    return list(loader)


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.fixture
def shards(tmp_path) -> tuple[str, dict]:
    uri = str(tmp_path / "shards")
    return uri, write_shards(uri, [7, 7, 7, 7, 5])  # 33 samples, uneven last shard


def test_two_ranks_two_workers_read_disjoint_samples_covering_the_kept_set(shards):
    uri, samples = shards
    per_rank = []
    for rank in range(2):
        loader = build_loader(uri, LoaderSettings(batch_size=3, seed=1, rank=rank, world_size=2, num_workers=2,
                                                  shuffle_buffer=4),
                              transform=None, epoch=0)
        # (33 // 2) // 3 = 5 batches on every rank; 33 - 2 * 5 * 3 = 3 samples dropped
        assert (loader.batches_per_epoch, len(loader), loader.samples_dropped) == (5, 5, 3)
        batches = run(loader)
        assert len(batches) == 5 and all(len(b["keys"]) == 3 for b in batches)
        for b in batches:
            for key, img, label in zip(b["keys"], b["images"], b["labels"].tolist()):
                assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32)
                assert label == samples[key][1]
                assert torch.equal(img, decode_image(samples[key][0]))
        per_rank.append(keys_of(batches))
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(per_rank[0]) == 15 and len(b) == 15 and not a & b
    assert (a | b) <= set(samples) and len(set(samples) - a - b) == 3
    assert epoch_length(uri, batch_size=3, world_size=2, num_workers=2) == 5


def test_order_is_a_function_of_seed_and_epoch(shards):
    uri, samples = shards

    def order(seed: int, epoch: int, workers: int = 0) -> list[str]:
        return keys_of(run(build_loader(uri, LoaderSettings(batch_size=4, seed=seed, num_workers=workers,
                                                            shuffle_buffer=5),
                                        transform=None, epoch=epoch)))

    e0 = order(0, 0)
    assert e0 == order(0, 0) and len(e0) == 32 and len(set(e0)) == 32
    assert order(0, 1) != e0 and order(1, 0) != e0
    assert set(order(0, 1)) <= set(samples)
    assert order(0, 0, workers=2) == order(0, 0, workers=2)


def test_resume_mid_epoch_yields_exactly_the_remaining_batches(shards):
    uri, _ = shards
    aug = MultiCropAugmentation(TINY)
    settings = LoaderSettings(batch_size=2, seed=3, rank=1, world_size=2, num_workers=2, shuffle_buffer=3)
    common = dict(transform=aug, epoch=2)
    full = run(build_loader(uri, settings, **common))
    assert len(full) == 8  # (33 // 2) // 2
    for start in (1, 4, 7, 8):
        resumed_loader = build_loader(uri, settings, start_batch=start, **common)
        assert len(resumed_loader) == 8 - start and resumed_loader.batches_per_epoch == 8
        resumed = run(resumed_loader)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[start:]], start
        for r, f in zip(resumed, full[start:]):
            assert torch.equal(r["labels"], f["labels"])
            assert len(r["crops"]) == 4 and all(torch.equal(x, y) for x, y in zip(r["crops"], f["crops"]))
    b = full[0]
    assert [tuple(c.shape) for c in b["crops"]] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 2
    assert b["crops"][0].dtype == torch.float32 and b["labels"].dtype == torch.long


def test_resume_skips_samples_without_decoding_or_augmenting(shards):
    uri, _ = shards
    augmented: list[tuple] = []
    aug = MultiCropAugmentation(TINY)

    def recording(img, generator):
        augmented.append(tuple(img.shape))
        return aug(img, generator)

    full = run(build_loader(uri, LoaderSettings(batch_size=4, seed=0), transform=aug, epoch=0))
    resumed = run(build_loader(uri, LoaderSettings(batch_size=4, seed=0), transform=recording, epoch=0, start_batch=5))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[5:]]
    assert len(augmented) == 4 * len(resumed) == 12  # only the 3 remaining batches were decoded and augmented
    # the same sample gets the same crops in both runs: augmentation follows (seed, epoch, key), not position
    assert all(torch.equal(x, y) for r, f in zip(resumed, full[5:]) for x, y in zip(r["crops"], f["crops"]))


def test_resampled_mode_has_the_requested_length_on_every_rank(shards):
    uri, samples = shards
    seen = []
    for rank in range(2):
        loader = build_loader(uri, LoaderSettings(batch_size=4, seed=0, rank=rank, world_size=2, num_workers=2,
                                                  resampled=True, epoch_length=9, shuffle_buffer=4),
                              transform=None, epoch=0)
        assert len(loader) == loader.batches_per_epoch == 9 and loader.samples_dropped == 0
        batches = run(loader)
        assert len(batches) == 9 and all(len(b["keys"]) == 4 for b in batches)
        seen.append(keys_of(batches))
    assert set(seen[0] + seen[1]) <= set(samples)
    assert max(Counter(seen[0] + seen[1]).values()) > 1  # 72 draws from 33 samples: repetition is by design
    default = build_loader(uri, LoaderSettings(batch_size=4, seed=0, resampled=True), transform=None, epoch=0)
    assert len(run(default)) == default.batches_per_epoch == 8  # the natural epoch: 33 // 4
    again = build_loader(uri, LoaderSettings(batch_size=4, seed=0, rank=0, world_size=2, num_workers=2,
                                             resampled=True, epoch_length=9, shuffle_buffer=4),
                         transform=None, epoch=0, start_batch=6)
    assert keys_of(run(again)) == seen[0][6 * 4:]


def test_resampled_repeats_get_different_crops(tmp_path):
    uri = str(tmp_path / "one")
    write_shards(uri, [3])
    batches = run(build_loader(uri, LoaderSettings(batch_size=3, seed=0, resampled=True, epoch_length=4,
                                                   shuffle_buffer=0),
                               transform=MultiCropAugmentation(TINY), epoch=0))
    firsts = {}
    repeats = 0
    for b in batches:
        for i, key in enumerate(b["keys"]):
            crop = b["crops"][0][i]
            if key in firsts:
                repeats += 1
                assert not torch.equal(crop, firsts[key])
            firsts[key] = crop
    assert repeats == 9  # 12 draws of 3 samples


def test_too_few_shards_fails_clearly(shards):
    uri, _ = shards
    with pytest.raises(ValueError, match=r"5 shards cannot feed 3 ranks x 2 workers = 6 readers"):
        build_loader(uri, LoaderSettings(batch_size=1, seed=0, rank=0, world_size=3, num_workers=2),
                     transform=None, epoch=0)
    with pytest.raises(ValueError, match="5 shards"):
        epoch_length(uri, batch_size=1, world_size=3, num_workers=2)
    with pytest.raises(ValueError, match="use a smaller batch_size"):
        build_loader(uri, LoaderSettings(batch_size=64, seed=0), transform=None, epoch=0)
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(uri, LoaderSettings(batch_size=4, seed=0), transform=None, epoch=0, start_batch=9)
    with pytest.raises(ValueError, match="resampled=True"):
        build_loader(uri, LoaderSettings(batch_size=4, seed=0, epoch_length=9), transform=None, epoch=0)


def test_inconsistent_shard_fails_instead_of_shortening_the_epoch(tmp_path):
    uri = str(tmp_path / "bad")
    write_shards(uri, [4, 4], manifest_sizes=[4, 6])  # the manifest promises 2 more samples than shard 1 holds
    with pytest.raises(RuntimeError, match="holds 4 samples but the manifest says 6"):
        run(build_loader(uri, LoaderSettings(batch_size=5, seed=0), transform=None, epoch=0))


def test_raw_bytes_mode_yields_the_encoded_jpegs(shards):
    uri, samples = shards
    batches = run(build_loader(uri, LoaderSettings(batch_size=4, seed=0, num_workers=2),
                               transform=None, epoch=0, decode=False))
    assert len(batches) == 8
    for b in batches:
        assert "images" not in b and "crops" not in b
        for key, enc in zip(b["keys"], b["encoded"]):
            assert enc.dtype == torch.uint8 and enc.ndim == 1 and bytes(enc.numpy()) == samples[key][0]
    with pytest.raises(ValueError, match="decode=True"):
        build_loader(uri, LoaderSettings(batch_size=4, seed=0),
                     transform=MultiCropAugmentation(TINY), epoch=0, decode=False)


def test_greyscale_jpeg_decodes_to_three_equal_channels():
    img = decode_image(jpeg(3, grey=True))
    assert img.shape == (3, 32, 32) and torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_plan_is_a_pure_function_and_splits_shards_between_workers():
    units = [Unit(f"s{i}", n) for i, n in enumerate([10, 10, 3])]
    plans = [plan_epoch(units, batch_size=2, seed=5, epoch=1, rank=r, world_size=2, num_workers=1) for r in range(2)]
    assert plans[0] == plan_epoch(units, batch_size=2, seed=5, epoch=1, rank=0, world_size=2, num_workers=1)
    covered = []
    for p in plans:
        assert p.batches_per_epoch == 5 and p.samples_dropped == 3
        covered += [(u, i) for seg in p.worker_segments for (u, lo, hi) in seg for i in range(lo, hi)]
    assert len(covered) == len(set(covered)) == 20  # disjoint, 2 ranks x 5 batches x 2 samples


def test_s3_shards_with_two_workers_read_the_same_as_local(shards, s3_bucket):
    local_uri, samples = shards
    s3_uri = f"{s3_bucket}/imagenet/train"
    dest = open_store(s3_uri)
    src = open_store(local_uri)
    for obj in src.list():
        dest.put_bytes(obj.key, src.get_bytes(obj.key))
    settings = LoaderSettings(batch_size=3, seed=4, rank=0, world_size=2, num_workers=2, shuffle_buffer=4)
    common = dict(transform=MultiCropAugmentation(TINY), epoch=1)
    from_s3 = run(build_loader(s3_uri, settings, **common))
    from_disk = run(build_loader(local_uri, settings, **common))
    assert len(from_s3) == 5 and [b["keys"] for b in from_s3] == [b["keys"] for b in from_disk]
    assert all(torch.equal(x, y) for a, b in zip(from_s3, from_disk) for x, y in zip(a["crops"], b["crops"]))
    assert set(keys_of(from_s3)) <= set(samples)


# -- ImageFolder source ------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path) -> tuple[str, dict[str, int]]:
    root = tmp_path / "folder"
    labels = {}
    for i in range(11):
        cls = CLASSES[i % 3]
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        if i == 4:  # a PNG among the JPEGs
            name = f"img{i}.png"
            Image.open(io.BytesIO(jpeg(i))).save(d / name, format="PNG")
        else:
            name = f"img{i}.JPEG"
            (d / name).write_bytes(jpeg(i, grey=i == 7))
        labels[f"{cls}/{name}"] = CLASSES.index(cls)
    (root / "README.txt").write_text("not an image")
    (root / CLASSES[0] / "notes.txt").write_text("not an image either")
    return str(root), labels


def test_image_folder_source_has_the_same_guarantees(image_folder):
    root, labels = image_folder
    per_rank = []
    for rank in range(2):
        settings = LoaderSettings(batch_size=2, seed=0, rank=rank, world_size=2, num_workers=2)
        common = dict(transform=MultiCropAugmentation(TINY), epoch=3)
        loader = build_loader(root, settings, **common)
        # (11 // 2) // 2 = 2 batches per rank, 11 - 2 * 2 * 2 = 3 dropped
        assert (loader.batches_per_epoch, loader.samples_dropped) == (2, 3)
        batches = run(loader)
        for b in batches:
            assert b["labels"].tolist() == [labels[k] for k in b["keys"]]
            assert b["crops"][0].shape == (2, 3, 32, 32)
        per_rank.append(keys_of(batches))
        resumed = run(build_loader(root, settings, start_batch=1, **common))
        assert [b["keys"] for b in resumed] == [b["keys"] for b in batches[1:]]
        assert all(torch.equal(x, y) for x, y in zip(resumed[0]["crops"], batches[1]["crops"]))
    assert len(set(per_rank[0])) == 4 and not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) <= set(labels)
    assert epoch_length(root, batch_size=2, world_size=2, num_workers=2) == 2


def test_source_that_is_neither_shards_nor_image_folder_fails_clearly(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="neither a shard set"):
        build_loader(str(tmp_path / "empty"), LoaderSettings(batch_size=1, seed=0), transform=None, epoch=0)


def test_webdataset_opens_s3_urls_through_the_registered_handler(shards, s3_bucket):
    import webdataset as wds
    from webdataset.gopen import gopen

    from dino_model.storage import ObjectNotFound

    local_uri, samples = shards
    url = f"{s3_bucket}/wds/train-000000.tar"
    open_store(f"{s3_bucket}/wds").put_bytes("train-000000.tar", open_store(local_uri).get_bytes("train-000000.tar"))
    got = list(wds.WebDataset(url, shardshuffle=False, nodesplitter=None))
    assert [s["__key__"] for s in got] == [f"img{i:05d}" for i in range(7)]
    assert all(s["jpg"] == samples[s["__key__"]][0] and int(s["cls"]) == samples[s["__key__"]][1] for s in got)
    with pytest.raises(ObjectNotFound, match="missing.tar"):
        gopen(f"{s3_bucket}/wds/missing.tar", "rb")
    with pytest.raises(ValueError, match="read-only"):
        gopen(url, "wb")
