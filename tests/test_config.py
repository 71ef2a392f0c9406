"""Training configuration: defaults, presets, files, overrides, validation messages and the dict round trip."""

from __future__ import annotations

import json

import pytest
import torch

from dino_model.config import PRESETS, ConfigError, DinoConfig, load_config, parse_override


def test_defaults_are_the_reference_recipe():
    c = DinoConfig().validate()
    assert (c.model.arch, c.model.patch_size, c.model.out_dim, c.model.norm_last_layer) == ("vit_small", 16, 65536, True)
    assert (c.crops.global_size, c.crops.local_size, c.crops.n_local) == (224, 96, 8)
    assert c.crops.global_scale == (0.4, 1.0) and c.crops.local_scale == (0.05, 0.4)
    assert (c.loss.warmup_teacher_temp, c.loss.teacher_temp, c.loss.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert (c.loss.student_temp, c.loss.center_momentum) == (0.1, 0.9)
    o = c.optim
    assert (o.optimizer, o.lr, o.min_lr, o.warmup_epochs) == ("adamw", 5e-4, 1e-6, 10)
    assert (o.weight_decay, o.weight_decay_end, o.momentum_teacher, o.clip_grad) == (0.04, 0.4, 0.996, 3.0)
    assert (o.clip_mode, o.freeze_last_layer) == ("per_param", 1)
    assert (c.train.epochs, c.data.batch_size_per_gpu, c.model.drop_path_rate) == (100, 64, 0.1)


def test_presets():
    boost = load_config(preset="boost")
    assert (boost.train.epochs, boost.loss.teacher_temp, boost.loss.warmup_teacher_temp_epochs) == (300, 0.07, 30)
    assert boost.model.norm_last_layer is False
    mc = load_config(preset="multicrop10")
    assert mc.crops.n_local == 10 and mc.crops.global_scale == (0.25, 1.0) and mc.crops.local_scale == (0.05, 0.25)
    small = load_config(preset="small")
    assert (small.crops.global_size, small.crops.local_size) == (128, 64)
    rn = load_config(preset="resnet50")
    assert rn.model.arch == "resnet50" and rn.model.sync_bn and rn.optim.optimizer == "sgd"
    assert rn.optim.weight_decay == rn.optim.weight_decay_end == 1e-4
    assert rn.crops.global_scale == (0.14, 1.0) and rn.crops.local_scale == (0.05, 0.14)
    chained = load_config(preset="boost,small")
    assert chained.train.epochs == 300 and chained.crops.global_size == 128
    assert load_config(preset="reference") == DinoConfig()
    assert set(PRESETS) == {"reference", "boost", "multicrop10", "small", "resnet50", "small-data-20k",
                            "small-data-50k", "small-data-100k", "small-data-200k"}
    with pytest.raises(ConfigError, match="preset"):
        load_config(preset="huge")


def test_the_small_data_recipe_is_chosen_by_the_data_sets_size(tmp_path):
    from dino_model.data.counting import count_images
    from tests.datasets import write_colour_set

    # the buckets (docs/small-data.md): K, teacher temperature and EMA momentum by size; 2x128 + 6x64 crops
    for size, (out_dim, temp, momentum) in {6000: (1024, 0.02, 0.99), 19_999: (1024, 0.02, 0.99),
                                            20_000: (2048, 0.02, 0.99), 75_000: (4096, 0.02, 0.99),
                                            150_000: (16384, 0.03, 0.991)}.items():
        c = load_config(preset="small-data", dataset_size=size)
        assert (c.model.out_dim, c.loss.teacher_temp, c.loss.warmup_teacher_temp, c.optim.momentum_teacher) == \
            (out_dim, temp, temp, momentum), size
        assert (c.crops.global_size, c.crops.local_size, c.crops.n_local, c.model.patch_size) == (128, 64, 6, 16)
        assert c.optim.lr == DinoConfig().optim.lr and c.model.norm_last_layer  # the rest is the paper's
    assert load_config(preset="small-data", dataset_size=1_281_167) == DinoConfig()
    with pytest.raises(ConfigError, match="small-data-20k"):
        load_config(preset="small-data")  # no size known: name a bucket
    # the size is counted only when the preset asks for it
    assert load_config(preset="boost", dataset_size=lambda: 1 / 0).train.epochs == 300
    shards = write_colour_set(tmp_path / "images", tmp_path / "shards", range(3), 4, seed=0, name="train")
    assert count_images(shards) == 12 and count_images(str(tmp_path / "images")) == 12


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "preset: small\n"
        "model: {arch: vit_tiny, out_dim: 128}\n"
        "optim:\n  lr: 1e-3\n  warmup_epochs: 1\n"
        "train: {epochs: 2}\n"
    )
    c = load_config(f, overrides=["optim.lr=2e-3", "crops.local_scale=[0.1, 0.3]", "data.epoch_length=null"])
    assert c.model.arch == "vit_tiny" and c.model.out_dim == 128
    assert c.crops.global_size == 128  # from the file's preset
    assert c.optim.lr == 2e-3  # override beats file ("1e-3" without a dot is a YAML string: still a float here)
    assert c.crops.local_scale == (0.1, 0.3)
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"train": {"seed": 7}}))
    assert load_config(j).train.seed == 7


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("model.arch=vit_huge", "model.arch"),
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("crops.global_scale=[0.6, 0.4]", "crops.global_scale"),
        ("crops.local_scale=[0.1]", "crops.local_scale"),
        ("optim.clip_mode=norm", "optim.clip_mode"),
        ("train.precision=fp8", "train.precision"),
        ("loss.center_momentum=1.5", "loss.center_momentum"),
        ("model.norm_last_layer=maybe", "model.norm_last_layer"),
        ("optim.warmup_epochs=200", "optim.warmup_epochs"),
        ("data.resampled=true", "data.epoch_length"),
        ("optim.lrr=1", "optim.lrr"),
        ("train.compile_mode=fastest", "train.compile_mode"),
        ("data.prefetch_batches=-1", "data.prefetch_batches"),
        ("nosection.x=1", "nosection"),
        ("train.epochs=true", "train.epochs"),  # a flag is not a number
        ("train.compile=1", "train.compile"),
        ("crops.flip_p=1.5", "crops.flip_p"),
        ("crops.mean=[0.5, 0.5]", "crops.mean"),
        ("checkpoint.uri=''", "checkpoint.uri"),
        ("model.img_size=8", "model.img_size"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert field in str(e.value)


def test_bad_file_and_override_syntax(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.yaml")


def test_dict_round_trip_is_plain_and_exact():
    c = load_config(preset="multicrop10", overrides=["logging.loggers=[console, 'jsonl:/tmp/x.jsonl']"])
    d = c.to_dict()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (str, int, float, bool, type(None)))

    assert plain(d)
    assert DinoConfig.from_dict(d) == c
    assert json.loads(json.dumps(d)) == d
    # plain enough for torch's weights_only loader (it is saved in every checkpoint)
    import io

    buf = io.BytesIO()
    torch.save({"config": d}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["config"] == d


def test_sections_built_in_code_name_the_dotted_field():
    from dino_model.config import CropsConfig

    with pytest.raises(ConfigError, match=r"crops\.n_local must be an integer >= 0, got -1"):
        CropsConfig(n_local=-1)
    assert CropsConfig(n_local=2).ncrops == 4
    with pytest.raises(ConfigError, match=r"unknown config field optim\.learning_rate \(known: .*\blr\b"):
        DinoConfig.from_dict({"optim": {"learning_rate": 1}})
    cfg = DinoConfig()
    cfg.optim.lr = -1.0  # assigned in code: validate() checks it
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        cfg.validate()


def test_from_dict_validates():
    d = DinoConfig().to_dict()
    d["data"]["batch_size_per_gpu"] = 0
    with pytest.raises(ConfigError, match="data.batch_size_per_gpu"):
        DinoConfig.from_dict(d)


def test_the_config_module_imports_neither_torch_nor_the_checkpoint_code():
    """config.py is read by commands before anything heavy starts; a checkpoint's config reaches it as a dict."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, dino_model.config\nprint(sorted(m for m in ('torch', 'dino_model.checkpoint') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_checkpoint_serves_as_a_config_file_through_its_saved_config(tmp_path):
    from dino_model.checkpoint import config_source, save_checkpoint
    from tasks.validation.training import resolve_training_config

    saved = load_config(overrides=["optim.lr=0.0123", "train.epochs=17"]).to_dict()
    written = save_checkpoint(str(tmp_path / "ckpt"), {"step": 3, "config": saved, "big": torch.zeros(1000)})
    assert config_source(written) == saved and config_source("run.yaml") == "run.yaml"
    cfg = load_config(config_source(written), overrides=["train.epochs=19"])
    assert (cfg.optim.lr, cfg.train.epochs) == (0.0123, 19)
    resolved = resolve_training_config("/data/train", "/ckpt", None, written, ["optim.min_lr=0"])
    assert (resolved["optim"]["lr"], resolved["optim"]["min_lr"], resolved["data"]["source"]) == (0.0123, 0, "/data/train")
    with pytest.raises(ConfigError, match="is a training checkpoint"):
        load_config(written)
