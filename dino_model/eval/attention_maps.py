"""Self-attention maps of the last block — the DINO paper's attention visualisations and their Jaccard scores.

As the reference ``visualize_attention.py``: the [CLS] -> patch attention of every head of the last block; the
mask of a head keeps the patches holding the top ``threshold`` (0.6) of its attention mass: sort the weights
ascending, normalise them to sum to 1, take the cumulative sum and keep the patches whose cumulative value is
strictly greater than ``1 - threshold`` (0.4); masks and maps are upsampled nearest-neighbour x patch size.
The sort is stable (the reference's is not), so equal weights are ordered by patch index — deterministic.

Scores: Jaccard (IoU) of each head's mask against a foreground mask, reported per head, for the best head, as
the mean over heads, and for the union of all heads' masks. An empty prediction and an empty foreground score 1
(the DAVIS convention).

Rendering produces PNG bytes in memory (for MLflow artifacts): the image, one overlay per head (the mask tinted
with the DAVIS palette's colour for that head, contour-free), the union, and the attention heat maps.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .davis_palette import DAVIS_PALETTE
from .transforms import normalize, to_float01

DEFAULT_THRESHOLD = 0.6


@torch.no_grad()
def cls_attention(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-block [CLS] -> patch attention ``[B, heads, H/p, W/p]`` of a normalised batch ``x`` whose sides are
    multiples of the patch size."""
    p = backbone.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if h * p != x.shape[-2] or w * p != x.shape[-1]:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    attn = backbone.get_last_selfattention(x)  # [B, heads, N+1, N+1]
    return attn[:, :, 0, 1:].reshape(x.shape[0], attn.shape[1], h, w).float()


def attention_masks(attn: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Boolean masks keeping each head's top ``threshold`` of attention mass; ``attn``: ``[heads, ...]`` (any
    trailing shape, e.g. ``[heads, h, w]``). Exactly the reference: sort ascending, normalise, cumulative sum,
    keep where cumsum > 1 - threshold."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = attn.reshape(attn.shape[0], -1).float()
    val, idx = torch.sort(flat, dim=1, stable=True)
    val = val / val.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(val, dim=1) > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)  # back to patch order
    return keep.reshape(attn.shape)


def upsample_nearest(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[heads, h, w]`` (bool or float) -> ``[heads, h*p, w*p]`` by nearest-neighbour repetition."""
    out = F.interpolate(maps[None].float(), scale_factor=patch_size, mode="nearest")[0]
    return out.bool() if maps.dtype == torch.bool else out


def jaccard(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; 1.0 when both are empty."""
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    gt = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt).bool()
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    union = (pred | gt).sum().item()
    return 1.0 if union == 0 else (pred & gt).sum().item() / union


@dataclass
class JaccardScores:
    """Jaccard of attention masks against a foreground mask."""

    per_head: list[float]
    best_head: int
    best: float
    mean: float
    union: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}jaccard_best_head": self.best, f"{prefix}jaccard_mean_heads": self.mean,
               f"{prefix}jaccard_union_heads": self.union}
        out.update({f"{prefix}jaccard_head{h}": v for h, v in enumerate(self.per_head)})
        return out


def jaccard_scores(masks: torch.Tensor, foreground: torch.Tensor | np.ndarray) -> JaccardScores:
    """Scores of per-head masks ``[heads, H, W]`` against a foreground ``[H, W]`` (ties: the lower head wins)."""
    fg = torch.as_tensor(np.asarray(foreground) if not isinstance(foreground, torch.Tensor) else foreground).bool()
    per_head = [jaccard(m, fg) for m in masks]
    best_head = int(np.argmax(per_head))
    return JaccardScores(per_head, best_head, per_head[best_head], float(np.mean(per_head)),
                         jaccard(masks.any(dim=0), fg))


@dataclass
class AttentionResult:
    """One image's attention analysis (all at the network's input resolution ``H x W``)."""

    #: The resized, patch-aligned image, float [3, H, W] in [0, 1] (un-normalised, for rendering).
    image: torch.Tensor
    #: [CLS] attention per head upsampled x patch, [heads, H, W].
    attention: torch.Tensor
    #: Thresholded masks per head, bool [heads, H, W].
    masks: torch.Tensor
    #: Foreground mask resized to [H, W] (None when not given).
    foreground: torch.Tensor | None
    #: Jaccard scores (None when no foreground was given).
    scores: JaccardScores | None


def _resize_and_align(img: torch.Tensor, size, patch: int, mode: InterpolationMode, antialias: bool):
    if size is not None:
        img = TF.resize(img, list(size) if isinstance(size, (tuple, list)) else [size], interpolation=mode,
                        antialias=antialias)
    h, w = img.shape[-2:]
    # like the reference: crop to a multiple of the patch size (top-left aligned)
    return img[..., : h - h % patch, : w - w % patch]


@torch.no_grad()
def analyze_image(
    backbone: torch.nn.Module,
    image: torch.Tensor,
    foreground: torch.Tensor | np.ndarray | None = None,
    size: int | tuple[int, int] | None = 480,
    threshold: float = DEFAULT_THRESHOLD,
    device: str | torch.device | None = None,
) -> AttentionResult:
    """Attention maps, masks and (with ``foreground``) Jaccard scores for one image.

    ``image``: ``[3, H, W]`` uint8 or float [0, 1]. ``size``: torchvision ``Resize`` semantics — an int resizes
    the short side keeping the aspect ratio (default 480), ``(h, w)`` resizes exactly (the reference's default is
    (480, 480)), None keeps the size; the result is then cropped to a multiple of the patch size like the
    reference. ``foreground`` (``[H0, W0]``, non-zero = object) is resized nearest-neighbour the same way."""
    p = backbone.patch_size
    img = _resize_and_align(to_float01(image), size, p, InterpolationMode.BILINEAR, True).clamp(0, 1)
    if img.shape[-2] < p or img.shape[-1] < p:
        raise ValueError(f"image smaller than one {p}px patch after resizing to {size}")
    if device is None:
        device = next(backbone.parameters()).device
    backbone.eval()
    attn = cls_attention(backbone, normalize(img)[None].to(device))[0].cpu()  # [heads, h, w]
    masks = upsample_nearest(attention_masks(attn, threshold), p)
    fg = scores = None
    if foreground is not None:
        fg_t = torch.as_tensor(np.asarray(foreground) if not isinstance(foreground, torch.Tensor) else foreground)
        if fg_t.dim() != 2:
            raise ValueError(f"foreground must be a 2-D mask, got shape {tuple(fg_t.shape)}")
        if fg_t.shape != image.shape[-2:]:
            raise ValueError(f"foreground {tuple(fg_t.shape)} and image {tuple(image.shape[-2:])} sizes differ")
        fg = _resize_and_align((fg_t > 0).to(torch.uint8)[None], size, p, InterpolationMode.NEAREST, False)[0] > 0
        scores = jaccard_scores(masks, fg)
    return AttentionResult(img, upsample_nearest(attn, p), masks, fg, scores)


def _to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    return (to_float01(img).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(image: torch.Tensor, mask: torch.Tensor, color=(255, 0, 0), alpha: float = 0.5) -> np.ndarray:
    """The image (``[3, H, W]``) with ``mask`` (``[H, W]``) tinted in ``color``: uint8 ``[H, W, 3]``."""
    base = _to_uint8_hwc(image).astype(np.float32)
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    base[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, dtype=np.float32)
    return base.round().astype(np.uint8)


def heatmap(attn: torch.Tensor) -> np.ndarray:
    """One head's attention ``[H, W]`` min-max scaled to a grey uint8 ``[H, W, 3]``."""
    a = attn.float()
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    g = (a * 255).round().to(torch.uint8).numpy()
    return np.repeat(g[..., None], 3, axis=2)


def render_png(result: AttentionResult, alpha: float = 0.5) -> bytes:
    """A PNG (bytes) with two rows: [image | head 0 mask | head 1 mask | ... | union (| foreground)] and
    [blank | head 0 attention | head 1 attention | ...]. Mask colours are the DAVIS palette's 1, 2, 3, ..."""
    heads = result.masks.shape[0]
    top = [_to_uint8_hwc(result.image)]
    top += [overlay(result.image, result.masks[h], DAVIS_PALETTE[1 + h % 255], alpha) for h in range(heads)]
    top.append(overlay(result.image, result.masks.any(0), (255, 255, 255), alpha))
    bottom = [np.zeros_like(top[0])] + [heatmap(result.attention[h]) for h in range(heads)]
    bottom.append(np.zeros_like(top[0]))
    if result.foreground is not None:
        top.append(overlay(result.image, result.foreground, (0, 255, 0), alpha))
        bottom.append(np.zeros_like(top[0]))
    grid = np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class DavisAttentionScores:
    """Attention-mask Jaccard averaged over the scored DAVIS frames (all objects = foreground)."""

    best_head: float
    mean_heads: float
    union_heads: float
    #: (sequence, frame name, scores) per scored frame
    frames: list[tuple[str, str, JaccardScores]]
    #: sequence -> PNG bytes of the overlay of its first scored frame
    overlays: dict[str, bytes]

    def as_dict(self, prefix: str = "attn_") -> dict[str, float]:
        return {f"{prefix}jaccard_best_head": self.best_head, f"{prefix}jaccard_mean_heads": self.mean_heads,
                f"{prefix}jaccard_union_heads": self.union_heads}


def davis_attention_scores(
    backbone: torch.nn.Module,
    root,
    sequences=None,
    frame_step: int = 10,
    max_frames: int | None = None,
    size: int | tuple[int, int] | None = 480,
    threshold: float = DEFAULT_THRESHOLD,
    render: bool = True,
    device: str | torch.device | None = None,
    renderer: Callable[[AttentionResult, str], bytes] | None = None,
) -> DavisAttentionScores:
    """Score attention masks on DAVIS frames: every ``frame_step``-th annotated frame (of the first ``max_frames``)
    of each sequence (default: the image set's), foreground = any object label (void ignored). Scores are the
    per-frame best-head / mean-over-heads / union-of-heads Jaccards averaged over frames. With ``render``, each
    sequence's first scored frame is drawn by ``renderer(result, "<sequence> frame <name>")`` (default: the
    unlabelled strip of :func:`render_png`)."""
    from .davis_propagation import list_sequences, load_sequence, read_frame, read_mask
    from .davis_metrics import VOID_LABEL

    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    names = list(sequences) if sequences is not None else list_sequences(root)
    seqs = [load_sequence(root, n) for n in names]  # validates every sequence before running the model
    frames: list[tuple[str, str, JaccardScores]] = []
    overlays: dict[str, bytes] = {}
    for seq in seqs:
        pairs = list(zip(seq.frames, seq.annotations))[: max_frames or None][::frame_step]
        for frame_path, ann in pairs:
            if ann is None:
                continue
            lab = read_mask(ann)
            fg = (lab > 0) & (lab != VOID_LABEL)
            res = analyze_image(backbone, read_frame(frame_path), fg, size, threshold, device)
            frames.append((seq.name, frame_path.stem, res.scores))
            if render and seq.name not in overlays:
                overlays[seq.name] = (renderer(res, f"{seq.name} frame {frame_path.stem}") if renderer
                                      else render_png(res))
    if not frames:
        raise ValueError("no annotated DAVIS frame to score")
    return DavisAttentionScores(
        best_head=float(np.mean([s.best for _, _, s in frames])),
        mean_heads=float(np.mean([s.mean for _, _, s in frames])),
        union_heads=float(np.mean([s.union for _, _, s in frames])),
        frames=frames,
        overlays=overlays,
    )
