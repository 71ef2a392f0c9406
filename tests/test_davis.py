"""DAVIS: J and F on synthetic masks with hand-computed values, the official statistics, label propagation on
hand-made features, and the whole protocol on davis-mini with a tiny ViT (few frames, downscaled)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dino_model.eval.davis_metrics import (
    boundary_tolerance,
    dilate_disk,
    db_eval_iou,
    db_statistics,
    disk,
    evaluate_sequence,
    f_measure,
    seg2bmap,
    summarize,
)
from dino_model.eval.davis_palette import DAVIS_PALETTE, DAVIS_PALETTE_FLAT
from dino_model.eval.davis_propagation import (
    PropagationConfig,
    evaluate_davis,
    indexed_png,
    load_sequence,
    norm_mask,
    one_hot_patch_labels,
    propagate_labels,
    propagate_sequence,
    read_frame,
    read_mask,
    window_mask,
)
from dino_model.models import build_backbone


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


# ---------------------------------------------------------------------------------------------------- metrics
def test_j_hand_computed():
    gt = _square((10, 10), 2, 6, 2, 6)  # 16 px
    pred = _square((10, 10), 2, 6, 4, 8)  # 16 px, overlap 4x2 = 8
    assert db_eval_iou(gt, pred) == pytest.approx(8 / 24)
    assert db_eval_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # empty union counts 1
    assert db_eval_iou(gt, np.zeros_like(gt)) == 0.0
    stack = db_eval_iou(np.stack([gt, np.zeros_like(gt)]), np.stack([pred, np.zeros_like(gt)]))
    assert stack.tolist() == pytest.approx([1 / 3, 1.0])


def test_seg2bmap_is_the_outline_offset_towards_the_origin():
    b = seg2bmap(_square((10, 10), 2, 6, 2, 6))
    outline = _square((10, 10), 1, 6, 1, 6) & ~_square((10, 10), 2, 5, 2, 5)
    assert np.array_equal(b, outline) and b.sum() == 16
    assert seg2bmap(np.ones((5, 5))).sum() == 0  # a full frame has no boundary


def test_disk_and_tolerance():
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(2).sum() == 13
    assert boundary_tolerance((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert boundary_tolerance((10, 10)) == 1  # ceil(0.113)
    assert boundary_tolerance((10, 10), bound_th=3) == 3


def test_disk_dilation_equals_binary_dilation_with_the_disk():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for radius in (1, 2, 5, 8):
        m = rng.random((40, 50)) < 0.01
        m[0, 0] = m[-1, 20] = True  # borders too
        assert np.array_equal(dilate_disk(m, radius), ndimage.binary_dilation(m, structure=disk(radius)))
    assert not dilate_disk(np.zeros((5, 5), bool), 3).any()


def test_f_hand_computed():
    gt = _square((10, 10), 2, 6, 2, 6)
    assert f_measure(gt, gt) == 1.0
    # shift by 3 columns; outlines are the 5x5 rings at cols 1..5 and 4..8; tolerance 1 px (plus-shaped disk):
    # pred ring pixels within 1 of the gt ring: row 1 cols 4,5,6; row 5 cols 4,5,6; col 4 rows 2..4 -> 9 of 16;
    # symmetric for recall -> P = R = F = 9/16
    pred = _square((10, 10), 2, 6, 5, 9)
    assert f_measure(pred, gt) == pytest.approx(9 / 16)
    # shift by 1 column: every pred ring pixel is within 1 px of the gt ring except none -> check the count:
    # pred ring cols 2..6; unmatched pred pixels: none on rows 1/5 (cols 2..6 are within 1 of cols 1..5),
    # col 6 rows 2..4 are 1 px from col 5 -> all 16 match; same for gt -> F = 1
    assert f_measure(_square((10, 10), 2, 6, 3, 7), gt) == 1.0
    # empty cases (the official conventions)
    empty = np.zeros((10, 10), bool)
    assert f_measure(empty, empty) == 1.0
    assert f_measure(empty, gt) == 0.0  # precision 1, recall 0
    assert f_measure(gt, empty) == 0.0  # precision 0, recall 1


def test_f_tolerance_scales_with_the_diagonal():
    shape = (480, 854)  # tolerance 8 px
    gt = _square(shape, 100, 300, 200, 500)
    assert f_measure(_square(shape, 100, 300, 208, 508), gt) == 1.0  # 8 px shift: within tolerance
    # 9 px shift (outlines: 201 x 301 rings of 1000 px at cols 199..499 and 208..508): matched pred pixels are
    # the top and bottom rows except the last column (2 x 300) and the 8 pixels at each end of the left column
    # that lie within 8 px of the gt's top/bottom rows (16); the right column is >= 9 px from everything.
    # By symmetry recall = precision -> F = 616 / 1000
    assert seg2bmap(gt).sum() == 1000
    assert f_measure(_square(shape, 100, 300, 209, 509), gt) == pytest.approx(0.616)


def test_statistics_hand_computed():
    m, r, d = db_statistics(np.array([0.0, 1.0]))
    assert (m, r, d) == (0.5, 0.5, -1.0)  # bins [0:1], [0:2], [1:2], [1:2] for 2 frames
    m, r, d = db_statistics(np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0]))
    assert m == pytest.approx(0.375) and r == pytest.approx(3 / 8)
    # 8 frames: ids = round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 6, 7] (np.round half to even: 2.75->3, 4.5->4,
    # 6.25->6); bins [0:3], [2:5], [4:7], [6:8] -> D = mean(1, .8, .6) - mean(0, 0)
    assert d == pytest.approx(0.8)


def test_evaluate_sequence_two_objects_first_last_excluded():
    shape = (10, 10)
    o1 = _square(shape, 0, 4, 0, 4)
    o2 = _square(shape, 6, 10, 6, 10)
    gt_frame = o1 * 1 + o2 * 2
    gt = np.stack([gt_frame] * 4).astype(np.uint8)
    pred = gt.copy()
    pred[0] = 0  # first and last frames are never scored: garbage there changes nothing
    pred[3] = 1
    pred[1][o2] = 0  # object 2 lost in frame 1, recovered in frame 2
    objs = evaluate_sequence(gt, pred, "seq")
    assert [o.name for o in objs] == ["seq_1", "seq_2"]
    assert objs[0].j_per_frame == [1.0, 1.0] and objs[0].f_per_frame == [1.0, 1.0]
    assert objs[1].j_per_frame == [0.0, 1.0] and objs[1].f_per_frame == [0.0, 1.0]
    assert (objs[1].j_mean, objs[1].j_recall, objs[1].j_decay) == (0.5, 0.5, -1.0)
    s = summarize(objs)
    assert s.j_mean == 0.75 and s.f_mean == 0.75 and s.jf_mean == 0.75
    assert s.per_sequence == {"seq": 0.75}
    # a second sequence with one perfect object: the overall mean is over objects, not sequences
    single = np.stack([o1.astype(np.uint8)] * 3)
    s2 = summarize(objs + evaluate_sequence(single, single, "other"))
    assert s2.jf_mean == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert s2.per_sequence == {"seq": 0.75, "other": 1.0}
    assert s2.as_dict()["davis_seq_other_jf"] == 1.0


def test_evaluate_sequence_bad_input():
    gt = np.zeros((4, 5, 5), np.uint8)
    gt[:, 1:3, 1:3] = 1
    with pytest.raises(ValueError, match="only 1 object"):
        evaluate_sequence(gt, gt * 2, "s")
    with pytest.raises(ValueError, match="at least 3"):
        evaluate_sequence(gt[:2], gt[:2], "s")
    with pytest.raises(ValueError, match="no object"):
        evaluate_sequence(gt * 0, gt, "s")


# ---------------------------------------------------------------------------------------------------- palette
def test_palette_matches_davis_annotations(shared_data):
    with Image.open(shared_data / "davis-mini/Annotations/480p/car-shadow/00000.png") as im:
        assert im.getpalette()[:768] == DAVIS_PALETTE_FLAT[: len(im.getpalette())]
    assert DAVIS_PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert DAVIS_PALETTE[255].tolist() == [224, 224, 192]  # the VOC "void" colour
    png = indexed_png(np.array([[0, 1], [2, 255]], np.uint8))
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "P" and np.array(im).tolist() == [[0, 1], [2, 255]]
        assert im.getpalette()[3:6] == [128, 0, 0]


# ---------------------------------------------------------------------------------------------------- propagation
def test_window_mask_and_one_hot():
    w = window_mask(3, 4, 1)
    assert w.shape == (12, 12)
    assert w[0].reshape(3, 4).int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert w[5].reshape(3, 4).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert torch.equal(window_mask(3, 4, 1, slice(4, 6)), w[4:6])
    mask = np.zeros((4, 6), np.uint8)
    mask[:2, 3:] = 2
    oh = one_hot_patch_labels(mask, (2, 3), 3)
    assert oh.shape == (3, 2, 3) and oh.sum(0).eq(1).all()
    assert oh.argmax(0).tolist() == [[0, 2, 2], [0, 0, 0]]  # PIL nearest samples pixel centres


def test_propagate_labels_hand_made():
    # a 1x3 grid, 2-D unit features: target patch i looks exactly like context patch (2 - i)
    e = torch.eye(2)
    f0 = torch.stack([e[0], e[1], torch.nn.functional.normalize(torch.ones(2), dim=0)])
    tar = f0.flip(0)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # one-hot, 3 classes x 3 patches
    # radius 0 = no spatial restriction (the reference's switch): top-1 takes each target's exact match
    out = propagate_labels(tar, [f0], [labels], (1, 3), PropagationConfig(topk=1, radius=0))
    assert torch.allclose(out, labels.flip(1))
    # radius 1: target 0 (the diagonal) cannot see source 2; its best sources 0 and 1 tie (sim .7071) and ties
    # with the k-th value are kept -> half/half; target 1 (e1) sees its match; target 2 (e0) sees sources 1, 2:
    # sims 0 and .7071 -> source 2's label
    out = propagate_labels(tar, [f0], [labels], (1, 3), PropagationConfig(topk=1, radius=1))
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    # top-2 over two context frames jointly: weights exp(sim / 0.1) normalised per target
    out = propagate_labels(tar, [f0, f0], [labels, labels], (1, 3), PropagationConfig(topk=2, radius=12))
    assert torch.allclose(out, labels.flip(1), atol=1e-6)  # both picks are the identical match in each frame
    # target 0 = (1/sqrt2, 1/sqrt2) against sources e0, e1, diag: sims .7071, .7071, 1 -> top-2 = diag + e0
    # (ties at the 2nd value are all kept: e0 and e1 both) -> weights exp(10), exp(7.071), exp(7.071)
    t0 = propagate_labels(tar, [f0], [labels], (1, 3), PropagationConfig(topk=2, radius=12, target_chunk=1))[:, 0]
    wd, wo = np.exp(10.0), np.exp(np.sqrt(0.5) / 0.1)
    assert t0.tolist() == pytest.approx([wo / (wd + 2 * wo), wo / (wd + 2 * wo), wd / (wd + 2 * wo)], rel=1e-5)


def test_norm_mask():
    m = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]], [[2.0, 2.0]]])
    out = norm_mask(m)
    assert out[0].tolist() == [[0.0, 1.0]] and out[1].tolist() == [[0.0, 0.0]] and out[2].tolist() == [[0.0, 0.0]]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16).eval()


def test_propagate_sequence_shapes(backbone, shared_data):
    seq = load_sequence(shared_data / "davis-mini", "car-shadow")
    frames = [read_frame(p) for p in seq.frames[:3]]
    cfg = PropagationConfig(short_side=96, n_last_frames=1)
    out = list(propagate_sequence(backbone, frames, seq.first_mask(), cfg))
    assert len(out) == 3
    assert np.array_equal(out[0], seq.first_mask())
    for m in out:
        assert m.shape == (480, 854) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    with pytest.raises(ValueError, match="multiples of the patch size"):
        list(propagate_sequence(backbone, frames, seq.first_mask(), PropagationConfig(short_side=100)))


def test_evaluate_davis_mini(backbone, shared_data, tmp_path):
    cfg = PropagationConfig(short_side=96)  # 854x480 -> 128x96 frames, a 6x8 patch grid
    res = evaluate_davis(backbone, shared_data / "davis-mini", out_uri=str(tmp_path / "pred"), config=cfg,
                         max_frames=3, progress=False)
    assert res.sequences == ["car-shadow", "motocross-jump", "kite-surf"]
    assert res.frames_per_sequence == {"car-shadow": 3, "motocross-jump": 3, "kite-surf": 3}
    s = res.scores
    for v in (s.jf_mean, s.j_mean, s.f_mean, s.j_recall, s.f_recall):
        assert 0.0 <= v <= 1.0
    assert s.jf_mean == pytest.approx((s.j_mean + s.f_mean) / 2)
    assert set(s.per_sequence) == set(res.sequences) and len(s.objects) == 3
    assert all(len(o.j_per_frame) == 1 for o in s.objects)  # 3 frames minus first and last
    written = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.png"))
    assert len(written) == 9 and written[0] == "car-shadow/00000.png"
    with Image.open(tmp_path / "pred/kite-surf/00002.png") as im:
        assert im.mode == "P" and im.size == (854, 480) and im.getpalette()[3:6] == [128, 0, 0]
    # the first frame's output is the given mask
    assert np.array_equal(read_mask(tmp_path / "pred/car-shadow/00000.png"),
                          read_mask(shared_data / "davis-mini/Annotations/480p/car-shadow/00000.png"))
    # scores recomputed from the written PNGs match
    gt = np.stack([read_mask(shared_data / f"davis-mini/Annotations/480p/kite-surf/{i:05d}.png") for i in range(3)])
    pred = np.stack([read_mask(tmp_path / f"pred/kite-surf/{i:05d}.png") for i in range(3)])
    from dino_model.eval.davis_metrics import evaluate_sequence as ev

    o = ev(gt, pred, "kite-surf")[0]
    assert (o.j_mean + o.f_mean) / 2 == pytest.approx(s.per_sequence["kite-surf"])


def test_missing_first_frame_mask_fails_before_work(backbone, shared_data, tmp_path):
    root = tmp_path / "davis"
    src = shared_data / "davis-mini"
    for sub in ("JPEGImages/480p/car-shadow", "Annotations/480p/car-shadow"):
        (root / sub).mkdir(parents=True)
        for p in sorted((src / sub).iterdir())[:3]:
            shutil.copy(p, root / sub / p.name)
    (root / "Annotations/480p/car-shadow/00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="'car-shadow' has no first-frame mask"):
        evaluate_davis(backbone, root, sequences=["car-shadow"], progress=False)
    with pytest.raises(FileNotFoundError, match="image set"):
        evaluate_davis(backbone, root, progress=False)
    with pytest.raises(FileNotFoundError, match="no frames"):
        evaluate_davis(backbone, root, sequences=["nope"], progress=False)
