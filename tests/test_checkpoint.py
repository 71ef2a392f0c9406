"""Checkpoints: naming, listing, keep-last, atomic writes on disk and S3, weights_only loading, RNG round trip, and
reference-implementation checkpoints for evaluation."""

from __future__ import annotations

import argparse
import logging
import pickle
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from dino_model.checkpoint import (
    capture_rng_state,
    check_plain,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    read_checkpoint_config,
    remove_stale_writes,
    restore_rng_state,
    save_checkpoint,
)
from dino_model.config import DinoConfig, load_config
from dino_model.meta_arch import DINO
from dino_model.reference_checkpoint import load_reference_checkpoint
from dino_model.storage import ObjectNotFound, S3Store, open_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_dino(out_dim: int = 64) -> DINO:
    torch.manual_seed(0)
    return DINO.from_config(load_config(overrides=[
        "model.arch=vit_tiny", "model.patch_size=16", "model.drop_path_rate=0.0", f"model.out_dim={out_dim}",
        "crops.n_local=2", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16"]))


def state(step: int, **extra) -> dict:
    return {"step": step, "config": DinoConfig().to_dict(), "weights": torch.full((3,), float(step)), **extra}


def test_names_sort_like_steps():
    assert checkpoint_name(1200) == "checkpoint-000001200.pt"
    assert sorted([checkpoint_name(10), checkpoint_name(9), checkpoint_name(100)]) == [
        checkpoint_name(9), checkpoint_name(10), checkpoint_name(100)]
    with pytest.raises(ValueError):
        checkpoint_name(-1)


def test_save_list_latest_keep_last(tmp_path):
    uri = str(tmp_path / "ckpt")
    assert latest_checkpoint(uri) is None
    for step in (5, 10, 15, 20):
        written = save_checkpoint(uri, state(step), keep_last=2)
        assert written.endswith(checkpoint_name(step))
    steps = [s for s, _ in list_checkpoints(uri)]
    assert steps == [15, 20]
    latest = latest_checkpoint(uri)
    assert latest.endswith(checkpoint_name(20))
    loaded = read_checkpoint(latest)  # weights_only=True inside
    assert loaded["step"] == 20 and torch.equal(loaded["weights"], torch.full((3,), 20.0))
    # Unrelated files and in-progress temp files are ignored.
    (tmp_path / "ckpt" / "notes.txt").write_text("x")
    (tmp_path / "ckpt" / ".tmp-checkpoint-000000099.pt.abc").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(uri)] == [15, 20]


def test_refused_state_leaves_previous_checkpoints_intact(tmp_path):
    uri = str(tmp_path)
    save_checkpoint(uri, state(1))

    @dataclass
    class NotPlain:
        x: int = 1

    with pytest.raises(TypeError, match=r"checkpoint\.extra.*NotPlain"):
        save_checkpoint(uri, state(2, extra=NotPlain()))
    with pytest.raises(TypeError, match=r"checkpoint\.rng\[0\]"):
        save_checkpoint(uri, state(2, rng=[np.zeros(3)]))
    assert [s for s, _ in list_checkpoints(uri)] == [1]
    assert list(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1)]


def test_interrupted_write_leaves_nothing(tmp_path):
    """A write that dies half way (here: an exception in the middle of the stream) leaves no object."""
    store = open_store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.open_write(checkpoint_name(3)) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("killed")
    assert list_checkpoints(str(tmp_path)) == []


def test_checkpoint_on_s3(s3_bucket):
    uri = f"{s3_bucket}/runs/r1"
    for step in (1, 2, 3):
        save_checkpoint(uri, state(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(uri)] == [2, 3]
    latest = latest_checkpoint(uri)
    assert latest == f"{uri}/{checkpoint_name(3)}"
    assert read_checkpoint(latest)["step"] == 3


def test_the_config_of_a_checkpoint_reads_alone_locally_and_on_s3(tmp_path, s3_bucket):
    """What the pretrain flow reads to find the MLflow run a checkpoint was logged into."""
    config = DinoConfig().to_dict()
    config["logging"]["loggers"] = ["console", "mlflow:0123abcd"]
    for uri in (str(tmp_path / "ckpt"), f"{s3_bucket}/runs/r2"):
        written = save_checkpoint(uri, state(4, config=config))
        assert read_checkpoint_config(written) == config
    with pytest.raises(ObjectNotFound):
        read_checkpoint_config(str(tmp_path / "ckpt" / checkpoint_name(5)))


def test_the_config_of_a_large_s3_checkpoint_is_read_without_its_tensors(s3_bucket, caplog):
    """The pretrain flow reads a checkpoint's config to find its MLflow run before each resume: on S3 that must not
    cost a download of the whole checkpoint (hundreds of MB for a ViT-S/16 with its optimiser state)."""
    config = DinoConfig().to_dict()
    config["logging"]["loggers"] = ["mlflow:feedbeef"]
    big = state(7, config=config)
    big["student"] = {"weight": torch.randn(2048, 2048)}  # 16 MiB of tensor bytes
    written = save_checkpoint(f"{s3_bucket}/runs/big", big)
    with caplog.at_level(logging.DEBUG, logger="dino_model.checkpoint"):
        assert read_checkpoint_config(written) == config
    (record,) = [r for r in caplog.records if "bytes" in r.getMessage()]
    fetched, size = record.args[1], record.args[2]
    assert size > 16 << 20 and fetched < 1 << 20, (fetched, size)
    assert torch.equal(read_checkpoint(written)["student"]["weight"], big["student"]["weight"])  # untouched


def test_stale_writes_removed_locally_and_nothing_else(tmp_path):
    uri = str(tmp_path / "ckpt")
    assert remove_stale_writes(uri) == []  # no folder yet
    save_checkpoint(uri, state(1))
    folder = tmp_path / "ckpt"
    stale = [folder / ".tmp-checkpoint-000000002.pt.abc123", folder / ".tmp-checkpoint-000000003.pt.x"]
    kept = [folder / ".tmp-other.bin.abc", folder / "checkpoint-000000002.pt.tmp", folder / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert remove_stale_writes(uri) == [str(p) for p in stale]
    assert sorted(p.name for p in folder.iterdir()) == sorted([checkpoint_name(1)] + [p.name for p in kept])
    assert remove_stale_writes(uri) == []


def test_stale_multipart_uploads_aborted_on_s3(s3_bucket):
    """A trainer killed during the upload of a large checkpoint leaves an incomplete multipart upload (its parts
    stay stored); only those of checkpoint keys directly under the checkpoint URI are aborted."""
    uri = f"{s3_bucket}/runs/r1"
    store = S3Store(uri)
    client, bucket = store.client, store.bucket

    def start_upload(key: str) -> str:
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"part of a checkpoint")
        return upload

    start_upload("runs/r1/checkpoint-000000005.pt")
    others = ["runs/r1/features.parquet", "runs/r1/sub/checkpoint-000000005.pt", "runs/r10/checkpoint-000000005.pt"]
    for key in others:
        start_upload(key)
    save_checkpoint(uri, state(4))
    removed = remove_stale_writes(uri)
    assert len(removed) == 1 and removed[0].startswith(f"{uri}/checkpoint-000000005.pt (incomplete upload ")
    left = sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    assert left == sorted(others)
    assert [s for s, _ in list_checkpoints(uri)] == [4]


def test_rng_round_trip_passes_weights_only(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    saved = capture_rng_state(torch.device("cpu"))
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(), [random.random() for _ in range(3)])
    check_plain(saved)
    save_checkpoint(str(tmp_path), {"step": 1, "rng": [saved]})
    loaded = read_checkpoint(latest_checkpoint(str(tmp_path)))["rng"][0]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(loaded, torch.device("cpu"))
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_model_and_optimizer_state_round_trip(tmp_path):
    model = tiny_dino()
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    model.forward_backward(crops, teacher_temp=0.04)
    opt.step()
    model.dino_loss.center.add_(0.5)
    ckpt = {"step": 1, "student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "dino_loss": model.dino_loss.state_dict(), "optimizer": opt.state_dict()}
    save_checkpoint(str(tmp_path), ckpt)
    loaded = read_checkpoint(latest_checkpoint(str(tmp_path)))
    other = tiny_dino()
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_()
    other.student.load_state_dict(loaded["student"])
    other.teacher.load_state_dict(loaded["teacher"])
    other.dino_loss.load_state_dict(loaded["dino_loss"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(other.student.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


# ------------------------------------------------------------------------------------------------------------------
# reference-format checkpoints
# ------------------------------------------------------------------------------------------------------------------


class RefHead(nn.Module):
    """The reference DINOHead's parameter layout: mlp + nn.utils.weight_norm'ed last layer (weight_g/weight_v)."""

    def __init__(self, ours: nn.Module, parametrized: bool):
        super().__init__()
        self.mlp = ours.mlp
        linear = nn.Linear(ours.last_layer.in_features, ours.last_layer.out_features, bias=False)
        if parametrized:
            self.last_layer = nn.utils.parametrizations.weight_norm(linear)
            self.last_layer.parametrizations.weight.original0.data.copy_(ours.last_layer.weight_g.data)
            self.last_layer.parametrizations.weight.original1.data.copy_(ours.last_layer.weight_v.data)
        else:
            self.last_layer = nn.utils.weight_norm(linear)
            self.last_layer.weight_g.data.copy_(ours.last_layer.weight_g.data)
            self.last_layer.weight_v.data.copy_(ours.last_layer.weight_v.data)


def reference_checkpoint(model: DINO, parametrized: bool = False) -> dict:
    """What the reference main_dino.py saves: DDP student ('module.' prefix), plain teacher, Namespace args."""
    def wrapper_sd(wrapper, prefix):
        sd = {f"{prefix}backbone.{k}": v for k, v in wrapper.backbone.state_dict().items()}
        head = RefHead(wrapper.head, parametrized)
        sd.update({f"{prefix}head.{k}": v for k, v in head.state_dict().items()})
        return sd

    return {
        "student": wrapper_sd(model.student, "module."),
        "teacher": wrapper_sd(model.teacher, ""),
        "optimizer": {},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64, lr=0.0005),
        "dino_loss": {"center": torch.arange(64.0).reshape(1, 64)},
    }


@pytest.mark.parametrize("parametrized", [False, True])
def test_reference_checkpoint_loads_for_evaluation(tmp_path, parametrized):
    model = tiny_dino()
    with torch.no_grad():  # make student and teacher differ so the test can tell them apart
        for p in model.teacher.parameters():
            p.add_(0.01)
    path = tmp_path / "checkpoint.pth"
    torch.save(reference_checkpoint(model, parametrized), path)  # full pickle, like the reference

    ref = load_reference_checkpoint(str(path))
    assert ref["args"]["arch"] == "vit_tiny" and ref["args"]["patch_size"] == 16
    assert torch.equal(ref["center"], torch.arange(64.0).reshape(1, 64))
    fresh = tiny_dino()
    fresh.teacher.backbone.load_state_dict(ref["teacher_backbone"])
    fresh.teacher.head.load_state_dict(ref["teacher_head"])
    fresh.student.backbone.load_state_dict(ref["student_backbone"])
    fresh.student.head.load_state_dict(ref["student_head"])
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.teacher([x]), model.teacher([x]), atol=1e-6)
        assert torch.allclose(fresh.student([x]), model.student([x]), atol=1e-6)
        assert not torch.allclose(fresh.teacher([x]), fresh.student([x]), atol=1e-4)


def test_reference_checkpoint_refuses_other_globals(tmp_path):
    """Only argparse.Namespace is allowed beyond plain types: a pickled arbitrary object is refused."""
    model = tiny_dino()
    ckpt = reference_checkpoint(model)
    ckpt["extra"] = DinoConfig()  # a dataclass: a global that must not be unpickled
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        load_reference_checkpoint(str(path))
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(str(path))


# ------------------------------------------------------------------------------------------------------------------
# training state as parts: the format does not know DINO; checkpoints of earlier versions load
# ------------------------------------------------------------------------------------------------------------------


def _legacy_v1_checkpoint(model: DINO, optimizer, step: int) -> dict:
    """A checkpoint exactly as ``make_checkpoint`` wrote it before the training state became parts (main at
    95fd77b: the same keys and values, each named by hand)."""
    from dino_model.checkpoint import CHECKPOINT_FORMAT, gather_rng_states

    return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": 0, "cursor": {"epoch": 0, "batch": step},
            "student": model.student_module().state_dict(), "teacher": model.teacher.state_dict(),
            "dino_loss": model.dino_loss.state_dict(), "optimizer": optimizer.state_dict(), "grad_scaler": {},
            "rng": gather_rng_states(torch.device("cpu")), "world_size": 1, "config": DinoConfig().to_dict(),
            "metrics": {"loss": 1.5}, "torch_version": str(torch.__version__)}


def _stepped(model: DINO) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    model.forward_backward(crops, teacher_temp=0.04)
    opt.step()
    model.dino_loss.center.add_(0.5)
    return opt


def test_parts_round_trip_and_a_new_part_needs_no_change_of_the_format(tmp_path):
    from dino_model.checkpoint import make_checkpoint, restore_checkpoint
    from dino_model.step import TrainingState

    class Counter:  # a piece of training state added later (e.g. a health monitor)
        def __init__(self, n=0):
            self.n = n

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    model = tiny_dino()
    written = TrainingState(model, _stepped(model), None)
    state = make_checkpoint({**written.parts(), "counter": Counter(7)}, step=3, cursor=(0, 3),
                            rng=[capture_rng_state()], config=DinoConfig().to_dict(), metrics={"loss": 2.0},
                            world_size=1)
    assert state["grad_scaler"] == {} and state["counter"] == {"n": 7}
    read = read_checkpoint(save_checkpoint(str(tmp_path), state))
    other = tiny_dino()
    other_opt = torch.optim.AdamW(other.student.parameters(), lr=1e-3)
    counter = Counter()
    restore_checkpoint(read, {**TrainingState(other, other_opt, None).parts(), "counter": counter}, rank=0,
                       device=torch.device("cpu"))
    assert counter.n == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="reserved"):
        make_checkpoint({"step": Counter()}, step=1, cursor=(0, 1), rng=[], config={}, metrics={}, world_size=1)
    with pytest.raises(ValueError, match="holds no missing"):
        restore_checkpoint(read, {"missing": Counter()}, rank=0, device=torch.device("cpu"))


def test_a_checkpoint_of_the_earlier_layout_loads_into_the_parts(tmp_path):
    from dino_model.checkpoint import restore_checkpoint
    from dino_model.step import TrainingState

    model = tiny_dino()
    opt = _stepped(model)
    uri = save_checkpoint(str(tmp_path), _legacy_v1_checkpoint(model, opt, 5))
    other = tiny_dino()
    other_opt = torch.optim.AdamW(other.student.parameters(), lr=1e-3)
    torch.manual_seed(5)
    for p in other.parameters():
        p.data.normal_()

    class Later:  # state saved only by later versions: optional, so it starts fresh
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            raise AssertionError("not in the checkpoint: must not be loaded")

    parts = {**TrainingState(other, other_opt, None).parts(), "later": Later()}
    restore_checkpoint(read_checkpoint(uri), parts, rank=0, device=torch.device("cpu"), optional=("later",))
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other_opt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
