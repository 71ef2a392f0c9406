"""The evaluation report's figures, drawn with matplotlib's object API (no pyplot: no global state, safe in worker
threads) and returned as ``data:`` URIs, so the report is one self-contained HTML file.

Photo grids (retrieval, attention heads, DAVIS frames) are JPEG (a tenth of a PNG's size for photographs); charts
(per-class accuracy, confusion matrix, feature map) are PNG.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np

from .davis_palette import DAVIS_PALETTE

#: Correct / wrong marks of the retrieval grid and the per-class bars.
RIGHT, WRONG = "#1a9850", "#d73027"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def image_bytes(fig, fmt: str = "png", dpi: int = 90) -> bytes:
    """A matplotlib figure encoded as PNG or JPEG."""
    buf = io.BytesIO()
    # PNG metadata would carry matplotlib's web address: the report holds no outside address, even encoded
    kwargs = {"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {"metadata": {"Software": None}}
    fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white", **kwargs)
    return buf.getvalue()


def data_uri(fig, fmt: str = "png", dpi: int = 90) -> str:
    """``data:image/<fmt>;base64,...`` of a matplotlib figure."""
    return f"data:image/{fmt};base64,{base64.b64encode(image_bytes(fig, fmt, dpi)).decode()}"


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def retrieval_grid(queries: Sequence[tuple[np.ndarray, str]],
                   neighbours: Sequence[Sequence[tuple[np.ndarray, str, float, bool]]]) -> str:
    """One row per query: the query image (its label), then its nearest training images, each framed green
    (same class) or red (another class) and titled with its label and cosine similarity."""
    cols = 1 + max((len(n) for n in neighbours), default=0)
    fig = _figure(1.5 * cols, 1.85 * len(queries))
    axes = np.atleast_2d(fig.subplots(len(queries), cols, squeeze=False))
    for r, ((img, text), row) in enumerate(zip(queries, neighbours)):
        ax = axes[r, 0]
        ax.imshow(img)
        _off(ax)
        ax.set_title(f"query\n{text}", fontsize=8.5, fontweight="bold")
        for side in ax.spines.values():
            side.set_edgecolor("#333333")
            side.set_linewidth(2.5)
        for c in range(1, cols):
            ax = axes[r, c]
            _off(ax)
            if c - 1 >= len(row):
                ax.set_visible(False)
                continue
            nimg, ntext, sim, right = row[c - 1]
            ax.imshow(nimg)
            ax.set_title(f"{'✓' if right else '✗'} {ntext}\nsim {sim:.2f}", fontsize=8,
                         color=RIGHT if right else WRONG)
            for side in ax.spines.values():
                side.set_edgecolor(RIGHT if right else WRONG)
                side.set_linewidth(3)
    return data_uri(fig, "jpeg", dpi=90)


def per_class_bars(names: Sequence[str], accuracy: Sequence[float], counts: Sequence[int], title: str) -> str:
    """Horizontal bars of per-class accuracy (percent), worst first, each labelled with its value and sample
    count; the mean over classes as a dashed line."""
    order = np.argsort(np.asarray(accuracy), kind="stable")
    fig = _figure(7.5, 0.8 + 0.27 * len(order))
    ax = fig.subplots()
    y = np.arange(len(order))
    acc = np.asarray(accuracy)[order]
    ax.barh(y, acc, color=[RIGHT if a >= 50 else WRONG for a in acc], alpha=0.8)
    ax.set_yticks(y, [names[i] for i in order], fontsize=7)
    ax.invert_yaxis()
    for yi, i in zip(y, order):
        ax.text(min(accuracy[i] + 1, 101), yi, f"{accuracy[i]:.1f} % (n={counts[i]})", va="center", fontsize=6.5)
    ax.axvline(float(np.mean(accuracy)), color="#444444", linestyle="--", linewidth=1)
    ax.set_xlim(0, 125)
    ax.set_xlabel(f"k-NN top-1 accuracy (%); dashed: mean over classes, {np.mean(accuracy):.1f} %")
    ax.set_title(title, fontsize=9)
    return data_uri(fig, "png")


def confusion_heatmap(matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], title: str) -> str:
    """Row-normalised confusion matrix (percent of each true class), annotated when small enough to read."""
    rows = matrix.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.32 * max(len(row_names), len(col_names)) + 2.0)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(col_names)), col_names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if len(row_names) <= 15 and len(col_names) <= 15:
        for (i, j), v in np.ndenumerate(pct):
            if matrix[i, j]:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 55 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of the true class")
    return data_uri(fig, "png")


def _blend(image: np.ndarray, mask: np.ndarray, color, alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    return out.round().astype(np.uint8)


def attention_heads(image: np.ndarray, attention: np.ndarray, masks: np.ndarray, foreground: np.ndarray | None,
                    jaccards: Sequence[float] | None, union_jaccard: float | None, title: str, fmt: str = "uri"):
    """One image's attention: the image, the ground-truth foreground (when known), then one panel per head — its
    attention map (colour scale per head) over the image with the outline of its mask (the patches holding 60 %
    of the head's attention) — titled with the head index and its Jaccard, best head in green; last, the union
    of the heads' masks. ``fmt``: ``"uri"`` (a JPEG ``data:`` URI, for the report) or ``"png"`` (bytes, for an
    artifact)."""
    heads = attention.shape[0]
    panels = 1 + (foreground is not None) + heads + 1
    cols = min(panels, 6)
    rows = -(-panels // cols)
    width = 2.3
    fig = _figure(width * cols, rows * (width * image.shape[0] / image.shape[1] + 0.35) + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        _off(ax)
        ax.set_visible(False)
    k = 0

    def panel(img, text, color="black", weight="normal"):
        nonlocal k
        ax = axes[k]
        ax.set_visible(True)
        ax.imshow(img)
        ax.set_title(text, fontsize=8, color=color, fontweight=weight)
        k += 1
        return ax

    panel(image, "image")
    if foreground is not None:
        panel(_blend(image, foreground, (0, 200, 0)), "ground truth (green)")
    best = int(np.argmax(jaccards)) if jaccards else None
    from matplotlib import colormaps

    cmap = colormaps["inferno"]
    for h in range(heads):
        a = attention[h].astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
        heat = (0.45 * image.astype(np.float32) + 0.55 * 255 * cmap(a)[..., :3]).round().astype(np.uint8)
        text = f"head {h}" + (f" · J {jaccards[h]:.1f} %" if jaccards else "")
        ax = panel(heat, text + (" (best)" if h == best else ""), RIGHT if h == best else "black",
                   "bold" if h == best else "normal")
        ax.contour(masks[h].astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=1.0)
    union = masks.any(axis=0)
    panel(_blend(image, union, (255, 255, 255), 0.55),
          "union of heads" + (f" · J {union_jaccard:.1f} %" if union_jaccard is not None else ""))
    fig.suptitle(title + "\ncolour: attention of the [CLS] token (per head, low → high); cyan outline: the head's "
                 "mask (60 % of its attention mass)", fontsize=9)
    return image_bytes(fig, "png", dpi=90) if fmt == "png" else data_uri(fig, "jpeg", dpi=90)


def davis_frames(frames: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str, float]], title: str) -> str:
    """Two rows: the ground-truth masks and the propagated masks (DAVIS palette colours) over each frame, titled
    with the frame and its Jaccard (foreground of all objects). The first frame is the sequence's first, whose
    mask is given."""
    cols = len(frames)
    aspect = frames[0][0].shape[0] / frames[0][0].shape[1] if frames else 0.56
    width = 2.8
    fig = _figure(width * cols, 2 * (width * aspect + 0.5) + 0.4)
    axes = fig.subplots(2, cols, squeeze=False)
    palette = np.asarray(DAVIS_PALETTE, dtype=np.float32)
    for c, (img, gt, pred, name, j) in enumerate(frames):
        for r, mask in enumerate((gt, pred)):
            ax = axes[r, c]
            _off(ax)
            out = img.astype(np.float32).copy()
            obj = (mask > 0) & (mask < 255)
            out[obj] = 0.45 * out[obj] + 0.55 * palette[mask[obj]]
            ax.imshow(out.round().astype(np.uint8))
            if r == 0:
                label = f"frame {name}: ground truth" + ("\n(the given first mask)" if c == 0 else "")
            elif c == 0:
                label = f"frame {name}: the given mask\n(propagation starts here)"
            else:
                label = f"frame {name}: propagated\nJ {j:.1f} %"
            ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return data_uri(fig, "jpeg", dpi=90)


def feature_map(points: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str) -> str:
    """A 2-D embedding of features, one colour per class (legend when there are at most 20 classes)."""
    from matplotlib import colormaps

    classes = sorted(set(int(v) for v in labels))
    fig = _figure(7.5, 6.0)
    ax = fig.subplots()
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "hsv"]
    for n, c in enumerate(classes):
        sel = labels == c
        color = cmap(n % cmap.N) if len(classes) <= 20 else cmap(n / max(len(classes), 1))
        ax.scatter(points[sel, 0], points[sel, 1], s=14 if len(points) < 2000 else 5, color=color, alpha=0.8,
                   label=names[c] if c < len(names) else str(c), linewidths=0)
    _off(ax)
    ax.set_title(title, fontsize=9)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return data_uri(fig, "png")
