"""DAVIS-2017 semi-supervised video object segmentation by label propagation (reference
``eval_video_segmentation.py``) and an end-to-end ``evaluate_davis``. The DAVIS folder layout (``list_sequences``,
``load_sequence``, ``read_mask``) is read by :mod:`dino_model.data.davis_layout` and re-exported here.

Protocol, per sequence (defaults are the reference's):

1. Frames are resized so the short side is ``short_side`` (480) and the long side, scaled proportionally, is
   floored to a multiple of 64 (854x480 -> 832x480); bilinear, ImageNet-normalised.
2. Features: the last block's patch tokens through the final norm (``get_intermediate_layers(x, 1)``, [CLS]
   dropped), L2-normalised, on the patch grid (h, w) = (H/p, W/p).
3. The first frame's mask is resized nearest-neighbour (PIL, as the reference) to the patch grid and one-hot
   encoded over the labels 0..K (K = largest label of the full-size first mask; void 255 is treated as background).
4. For each next frame, the context is the first frame plus the ``n_last_frames`` (7) previous frames, each with
   its *soft* patch-level label map (before upsampling and argmax). Affinity = exp(cos-sim / 0.1), zero outside a
   square window of radius ``radius`` (12) patches; per target patch only the ``topk`` (5) largest affinities over
   all context frames jointly are kept (ties with the 5th are kept too, as the reference's ``aff < min`` rule), and
   each target's column is normalised to sum 1. The label map = context labels x affinity.
5. The map is upsampled bilinearly x patch size, each channel min-max normalised (channels whose maximum is 0 are
   left alone; a constant positive channel becomes 0 instead of the reference's NaN), argmax, and resized
   nearest-neighbour back to the original frame size. The first frame's output is its given mask.

Output masks are written as indexed PNGs with the DAVIS palette (``<out>/<sequence>/<frame>.png``) through
:mod:`dino_model.storage`, and scored with :mod:`dino_model.eval.davis_metrics`.

The only deliberate difference from the reference's preprocessing: the reference resizes uint8 frames with
OpenCV and divides by a mistyped std (0.228 for red); here the float frame is resized (no uint8 rounding) and the
standard ImageNet std (0.229) is used.

Affinities are computed ``target_chunk`` target patches at a time, so ViT/8 at 480p (6,240 patches x 8 context
frames) stays well under a GB.
"""

from __future__ import annotations

import io
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from dino_model.data.davis_layout import DavisSequence, list_sequences, load_sequence, read_mask
from dino_model.storage import open_store

from .davis_metrics import VOID_LABEL, DavisScores, ObjectScores, evaluate_sequence, summarize
from .davis_palette import DAVIS_PALETTE_FLAT
from .transforms import normalize, resize_to_multiple, target_size_multiple, to_float01


# ----------------------------------------------------------------------------------------------------------------
# DAVIS folder layout: dino_model/data/davis_layout.py (torch-free, so input checks can use it); frames as tensors
# ----------------------------------------------------------------------------------------------------------------
def read_frame(path: str | os.PathLike) -> torch.Tensor:
    """An RGB frame as uint8 ``[3, H, W]``."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def indexed_png(mask: np.ndarray) -> bytes:
    """A label map ``[H, W]`` (values < 256) as an indexed PNG with the DAVIS palette."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"indexed PNGs need a 2-D label map, got shape {mask.shape}")
    im = Image.fromarray(mask.astype(np.uint8))  # mode L; putpalette turns it into P without remapping
    im.putpalette(DAVIS_PALETTE_FLAT)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# label propagation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PropagationConfig:
    """Label-propagation settings (reference defaults)."""

    #: Short side of the resized frames (multiple of the patch size).
    short_side: int = 480
    #: The long side is floored to a multiple of this (multiple of the patch size).
    multiple: int = 64
    #: Previous frames in the context besides the first one.
    n_last_frames: int = 7
    #: Radius, in patches, of the square window of allowed source patches (0 = no restriction).
    radius: int = 12
    #: Number of source patches kept per target, over all context frames jointly.
    topk: int = 5
    #: Temperature of the affinity exp(sim / temperature).
    temperature: float = 0.1
    #: Target patches processed at once (memory knob; results do not depend on it).
    target_chunk: int = 1024

    def __post_init__(self):
        for name in ("short_side", "multiple", "topk", "target_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_last_frames", "radius"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def check_patch(self, patch_size: int) -> None:
        if self.short_side % patch_size or self.multiple % patch_size:
            raise ValueError(f"short_side ({self.short_side}) and multiple ({self.multiple}) must be multiples of "
                             f"the patch size {patch_size}")


def one_hot_patch_labels(mask: np.ndarray, grid_hw: tuple[int, int], num_labels: int) -> torch.Tensor:
    """The first mask resized nearest-neighbour (PIL) to the patch grid and one-hot encoded: ``[C, h, w]``."""
    lab = np.asarray(mask).copy()
    lab[lab == VOID_LABEL] = 0
    h, w = grid_hw
    small = np.array(Image.fromarray(lab.astype(np.uint8)).resize((w, h), Image.NEAREST))
    return F.one_hot(torch.from_numpy(small).long(), num_labels).permute(2, 0, 1).float()


def window_mask(h: int, w: int, radius: int, rows: slice | None = None, device=None) -> torch.Tensor:
    """Bool ``[targets, h*w]``: source patch within ``radius`` patches (Chebyshev) of the target patch."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    ty, tx = (ys[rows], xs[rows]) if rows is not None else (ys, xs)
    return ((ty[:, None] - ys[None]).abs() <= radius) & ((tx[:, None] - xs[None]).abs() <= radius)


def propagate_labels(
    feat_tar: torch.Tensor,
    ctx_feats: Sequence[torch.Tensor],
    ctx_labels: Sequence[torch.Tensor],
    grid_hw: tuple[int, int],
    cfg: PropagationConfig,
) -> torch.Tensor:
    """One propagation step. ``feat_tar``: ``[h*w, D]`` L2-normalised target features; ``ctx_feats``: per
    context frame ``[h*w, D]`` (normalised); ``ctx_labels``: per context frame ``[C, h*w]`` soft labels.
    Returns the target's soft label map ``[C, h*w]``."""
    h, w = grid_hw
    n = h * w
    src = torch.cat(list(ctx_feats), dim=0)  # [ctx*n, D]
    labels = torch.cat(list(ctx_labels), dim=1)  # [C, ctx*n]
    n_ctx = len(ctx_feats)
    out = torch.empty(labels.shape[0], n, dtype=labels.dtype, device=labels.device)
    for start in range(0, n, cfg.target_chunk):
        rows = slice(start, min(start + cfg.target_chunk, n))
        aff = torch.exp(feat_tar[rows] @ src.T / cfg.temperature)  # [t, ctx*n]
        if cfg.radius > 0:
            aff = aff * window_mask(h, w, cfg.radius, rows, aff.device).repeat(1, n_ctx)
        k = min(cfg.topk, aff.shape[1])
        kth = torch.topk(aff, k, dim=1).values[:, -1:]
        aff = torch.where(aff < kth, torch.zeros_like(aff), aff)
        aff = aff / aff.sum(dim=1, keepdim=True)
        out[:, rows] = labels @ aff.T
    return out


def norm_mask(m: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max normalisation of ``[C, H, W]`` (channels whose max is <= 0 are left unchanged)."""
    m = m.clone()
    for c in range(m.shape[0]):
        ch = m[c]
        if ch.max() > 0:
            ch = ch - ch.min()
            top = ch.max()
            m[c] = ch / top if top > 0 else torch.zeros_like(ch)
    return m


@torch.no_grad()
def frame_features(backbone: torch.nn.Module, frame: torch.Tensor, cfg: PropagationConfig, device) -> torch.Tensor:
    """L2-normalised last-block patch features ``[h*w, D]`` of one uint8/float ``[3, H, W]`` frame."""
    x = normalize(resize_to_multiple(to_float01(frame), cfg.short_side, cfg.multiple))
    tokens = backbone.get_intermediate_layers(x[None].to(device), n=1)[0][0, 1:]
    return F.normalize(tokens.float(), dim=1, p=2)


@torch.no_grad()
def propagate_sequence(
    backbone: torch.nn.Module,
    frames: Iterable[torch.Tensor],
    first_mask: np.ndarray,
    config: PropagationConfig | None = None,
    device: str | torch.device | None = None,
) -> Iterator[np.ndarray]:
    """Segment a video from its first-frame mask; yields one uint8 label map per frame (original size), the
    first being ``first_mask`` itself. ``frames``: ``[3, H, W]`` uint8/float tensors, consumed lazily."""
    cfg = config or PropagationConfig()
    p = backbone.patch_size
    cfg.check_patch(p)
    if device is None:
        device = next(backbone.parameters()).device
    backbone.eval()
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2:
        raise ValueError(f"first_mask must be a 2-D label map, got shape {first_mask.shape}")
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("the sequence has no frame")
    ori_h, ori_w = first.shape[-2:]
    if first_mask.shape != (ori_h, ori_w):
        raise ValueError(f"first mask {first_mask.shape} and first frame {(ori_h, ori_w)} sizes differ")
    th, tw = target_size_multiple(ori_h, ori_w, cfg.short_side, cfg.multiple)
    grid = (th // p, tw // p)
    lab = first_mask.copy()
    lab[lab == VOID_LABEL] = 0
    num_labels = int(lab.max()) + 1
    first_feat = frame_features(backbone, first, cfg, device)
    if first_feat.shape[0] != grid[0] * grid[1]:
        raise RuntimeError(f"backbone returned {first_feat.shape[0]} patches, expected {grid[0] * grid[1]}")
    first_labels = one_hot_patch_labels(lab, grid, num_labels).reshape(num_labels, -1).to(device)
    yield lab.astype(np.uint8)
    queue: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=cfg.n_last_frames)
    for frame in it:
        if frame.shape[-2:] != (ori_h, ori_w):
            raise ValueError(f"frame size {tuple(frame.shape[-2:])} differs from the first frame's {(ori_h, ori_w)}")
        feat = frame_features(backbone, frame, cfg, device)
        ctx_feats = [first_feat] + [f for f, _ in queue]
        ctx_labels = [first_labels] + [s for _, s in queue]
        soft = propagate_labels(feat, ctx_feats, ctx_labels, grid, cfg)  # [C, h*w]
        if cfg.n_last_frames > 0:
            queue.append((feat, soft))
        up = F.interpolate(soft.reshape(1, num_labels, *grid), scale_factor=p, mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)[0]
        seg = norm_mask(up).argmax(dim=0).to(torch.uint8).cpu().numpy()
        yield np.array(Image.fromarray(seg).resize((ori_w, ori_h), Image.NEAREST))


# ----------------------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DavisResult:
    """Scores and where the predicted PNGs went."""

    scores: DavisScores
    sequences: list[str]
    frames_per_sequence: dict[str, int] = field(default_factory=dict)
    #: URI of the folder holding ``<sequence>/<frame>.png`` (None when not written).
    predictions_uri: str | None = None


def evaluate_davis(
    backbone: torch.nn.Module,
    root: str | os.PathLike,
    sequences: Sequence[str] | None = None,
    out_uri: str | None = None,
    config: PropagationConfig | None = None,
    image_set: str = "2017/val.txt",
    resolution: str = "480p",
    max_frames: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DavisResult:
    """Propagate and score every sequence (default: those of ``ImageSets/<image_set>``).

    All sequences are checked first (frames, first-frame mask, a ground-truth mask for every frame) so bad input
    fails before any heavy work. ``max_frames`` keeps only the first N frames of each sequence (quick checks; the
    last kept frame is then the one excluded from scoring). ``out_uri`` (local or s3://) receives the indexed PNGs.
    """
    cfg = config or PropagationConfig()
    cfg.check_patch(backbone.patch_size)
    names = list(sequences) if sequences is not None else list_sequences(root, image_set)
    if not names:
        raise ValueError("no DAVIS sequence to evaluate")
    if max_frames is not None and max_frames < 3:
        raise ValueError(f"max_frames must be >= 3 (first and last frames are not scored), got {max_frames}")
    seqs = []
    for name in names:
        seq = load_sequence(root, name, resolution)
        if max_frames is not None:
            seq = DavisSequence(seq.name, seq.frames[:max_frames], seq.annotations[:max_frames])
        if not seq.has_all_annotations():
            missing = [f for f, a in zip(seq.frame_names, seq.annotations) if a is None]
            raise FileNotFoundError(f"sequence {name!r}: no ground truth for frame(s) {missing[:5]} — "
                                    "scoring needs every frame annotated (val set)")
        if len(seq.frames) < 3:
            raise ValueError(f"sequence {name!r} has {len(seq.frames)} frames; at least 3 are needed")
        seqs.append(seq)
    store = open_store(out_uri) if out_uri is not None else None
    objects: list[ObjectScores] = []
    counts: dict[str, int] = {}
    for seq in tqdm(seqs, disable=not progress, desc="davis", unit="seq"):
        frames = (read_frame(p) for p in seq.frames)
        preds = []
        for name, pred in zip(seq.frame_names, propagate_sequence(backbone, frames, seq.first_mask(), cfg, device)):
            preds.append(pred)
            if store is not None:
                store.put_bytes(f"{seq.name}/{name}.png", indexed_png(pred))
        gt = np.stack([read_mask(a) for a in seq.annotations])  # type: ignore[arg-type]
        objects.extend(evaluate_sequence(gt, np.stack(preds), seq.name))
        counts[seq.name] = len(preds)
    return DavisResult(summarize(objects), [s.name for s in seqs], counts, store.uri if store is not None else None)
