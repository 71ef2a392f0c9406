"""The evaluation report: one self-contained HTML page (figures inline as ``data:`` URIs, no external address: it
opens offline, from a download or an e-mail) that shows what the scores mean.

Sections (each built by one function, from features, shard sets and the backbone; any subset makes a report):

* ``scores``: every score of the evaluation in reading order, in percent (:mod:`dino_model.eval.score_names`);
* ``retrieval`` (:func:`retrieval_section`): val queries (one class after another) and their nearest training
  images by cosine similarity of the features, labels shown, right/wrong marked;
* ``knn`` (:func:`knn_section`): the weighted k-NN's per-class accuracy and confusion matrix (the most confused
  pairs for sets of more than 30 classes), with its overall accuracy checked against the recorded score;
* ``attention`` (:func:`attention_section`): the last block's attention per head on a few DAVIS frames, each head
  titled with its index and Jaccard against the ground truth (or on val images, without Jaccard, when DAVIS did
  not run: :func:`attention_images_section`);
* ``davis`` (:func:`davis_section`): frames of one sequence with the ground-truth and the propagated masks;
* ``feature-map`` (:func:`feature_map_section`): a t-SNE map (scikit-learn) of val features coloured by class.

Use::

    sections = [scores_section(metrics, sets), retrieval_section(train, val, train_set, val_set, names), ...]
    html = render_report("dino-backbone v3", [("model", "models:/dino-backbone/3")], sections)

No Prefect here: ``tasks.evaluation.report`` gathers the inputs and logs the page to the evaluation run.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import report_figures as figures
from .score_names import UNIT, display, label, ordered

#: Classes up to which the confusion matrix is drawn in full (beyond: the most confused pairs, as a table).
FULL_CONFUSION_MAX_CLASSES = 30
#: Classes up to which every class gets a bar (beyond: the 15 worst and the 15 best).
ALL_BARS_MAX_CLASSES = 40


@dataclass
class Split:
    """Features of one split, rows in the shard set's manifest order (row i = sample i)."""

    labels: np.ndarray  # int64 [N], class indices of the training set
    features: np.ndarray  # float [N, D]
    keys: list[str] | None = None


@dataclass
class ReportSection:
    id: str
    title: str
    html: str


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _figure(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in numeric else ""}">{_esc(v)}</td>'
                                     for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def thumbnail(data: bytes, size: int = 112) -> np.ndarray:
    """An encoded image as a ``size`` x ``size`` uint8 HWC array (short side resized, centre crop)."""
    from torchvision.transforms.v2 import functional as TF

    from dino_model.data.reader import decode_image

    img = TF.center_crop(TF.resize(decode_image(data), [size], antialias=True), [size, size])
    return img.permute(1, 2, 0).numpy()


def class_display_names(classes: Sequence[str], class_names: dict[str, str] | None) -> list[str]:
    """Index -> what a person reads: the class's human name when the manifest has one (``tench``), else its id."""
    names = class_names or {}
    return [str(names.get(c) or c) for c in classes]


# --------------------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------------------


def scores_section(metrics: dict[str, float], set_of: dict[str, str]) -> ReportSection:
    """Every score (percent, 2 decimals) in reading order, with the evaluation set each was measured on."""
    rows = [(set_of.get(m, ""), label(m), display(metrics[m]), m) for m in ordered(metrics)]
    body = (f"<p>All scores in percent ({UNIT}): accuracies, and the attention Jaccard and DAVIS J / F / J&amp;F "
            "multiplied by 100.</p>" + _table(["evaluation set", "score", UNIT, "metric"], rows, numeric=(2,)))
    return ReportSection("scores", "Scores", body)


# --------------------------------------------------------------------------------------------------------------
# nearest-neighbour retrieval
# --------------------------------------------------------------------------------------------------------------


def pick_queries(labels: np.ndarray, n: int) -> list[int]:
    """``n`` val rows spread over the classes: the first sample of each class (in class order), then the second
    of each, and so on — deterministic, every class shown before any is shown twice."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(int(c), []).append(i)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][depth])
        depth += 1
    return out


def _normalised(x: np.ndarray, device) -> torch.Tensor:
    return F.normalize(torch.as_tensor(np.asarray(x, dtype=np.float32)).to(device), dim=1)


def retrieval_section(train: Split, val: Split, train_set, val_set, names: Sequence[str], queries: int = 16,
                      neighbours: int = 8, device: str | torch.device = "cpu") -> ReportSection:
    """``queries`` val images and their ``neighbours`` nearest training images (cosine similarity of the
    features), each neighbour marked right (same class as the query) or wrong."""
    from .knn import nearest_neighbors

    rows = pick_queries(val.labels, queries)
    k = min(neighbours, len(train.labels))
    sims, idx = nearest_neighbors(_normalised(train.features, device), _normalised(val.features[rows], device), k)
    sims, idx = sims.cpu().numpy(), idx.cpu().numpy()
    val_images = val_set.fetch(rows)
    train_images = train_set.fetch(sorted(set(idx.ravel().tolist())))
    for where, images, split in ((rows, val_images, val), (idx.ravel().tolist(), train_images, train)):
        if split.keys is not None:
            for i in where:
                if images[i][0] != split.keys[i]:
                    raise ValueError(f"feature row {i} is sample {split.keys[i]!r} but the shard set holds "
                                     f"{images[i][0]!r} there: the features are stale, re-extract them")
    q = [(thumbnail(val_images[r][1]), names[int(val.labels[r])]) for r in rows]
    grid = []
    hits = 0
    for n, r in enumerate(rows):
        row = []
        for s, j in zip(sims[n], idx[n]):
            right = int(train.labels[j]) == int(val.labels[r])
            hits += right
            row.append((thumbnail(train_images[int(j)][1]), names[int(train.labels[j])], float(s), right))
        grid.append(row)
    total = len(rows) * k
    body = (f"<p>{len(rows)} val images (one class after another), each followed by its {k} nearest training "
            f"images by cosine similarity of the backbone's features. Green ✓: same class as the query; red ✗: "
            f"another class. {hits} of {total} neighbours ({100.0 * hits / max(total, 1):.1f} %) share the "
            "query's class.</p>")
    body += _figure(figures.retrieval_grid(q, grid), "nearest training images of val queries")
    return ReportSection("retrieval", "Nearest-neighbour retrieval", body)


# --------------------------------------------------------------------------------------------------------------
# k-NN per class
# --------------------------------------------------------------------------------------------------------------


def knn_section(train: Split, val: Split, names: Sequence[str], k: int = 20, temperature: float = 0.07,
                recorded_top1: float | None = None, device: str | torch.device = "cpu") -> ReportSection:
    """The weighted k-NN's (``k``, ``temperature``) per-class accuracy and confusion matrix on val."""
    from .knn import knn_predict

    pred = knn_predict(train.features, train.labels, val.features, k=k, T=temperature, num_classes=len(names),
                       device=device)
    truth = val.labels.astype(np.int64)
    overall = 100.0 * float((pred == truth).mean())
    present = sorted(set(truth.tolist()))
    acc = [100.0 * float((pred[truth == c] == c).mean()) for c in present]
    counts = [int((truth == c).sum()) for c in present]
    check = ""
    if recorded_top1 is not None:
        same = abs(overall - recorded_top1) < 1e-6
        check = (f" It equals the recorded k-NN {k} top-1 ({display(recorded_top1)} %)." if same else
                 f" <strong>It differs from the recorded k-NN {k} top-1 ({display(recorded_top1)} %).</strong>")
    body = (f"<p>Weighted k-NN, k = {k}, T = {temperature}: {display(overall)} % of {len(truth)} val images "
            f"classified right; mean of the per-class accuracies {display(float(np.mean(acc)))} %.{check}</p>")
    if len(present) <= ALL_BARS_MAX_CLASSES:
        shown, note = list(range(len(present))), f"all {len(present)} val classes"
    else:
        order = np.argsort(acc, kind="stable")
        shown = sorted(set(order[:15].tolist()) | set(order[-15:].tolist()))
        note = f"the 15 worst and 15 best of {len(present)} val classes"
    body += _figure(figures.per_class_bars([names[present[i]] for i in shown], [acc[i] for i in shown],
                                           [counts[i] for i in shown], f"k-NN {k} top-1 per class ({note})"),
                    f"per-class accuracy ({note})")
    classes = sorted(set(present) | set(pred.tolist()))
    if len(classes) <= FULL_CONFUSION_MAX_CLASSES:
        where = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(present), len(classes)), dtype=np.int64)
        row = {c: i for i, c in enumerate(present)}
        for t, p in zip(truth.tolist(), pred.tolist()):
            matrix[row[t], where[p]] += 1
        body += _figure(figures.confusion_heatmap(matrix, [names[c] for c in present], [names[c] for c in classes],
                                                  f"k-NN {k} confusion matrix (rows: true class, % of the row)"),
                        "confusion matrix")
    else:
        pairs: dict[tuple[int, int], int] = {}
        for t, p in zip(truth.tolist(), pred.tolist()):
            if t != p:
                pairs[(t, p)] = pairs.get((t, p), 0) + 1
        top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
        body += "<p>The most frequent confusions (the full matrix has too many classes to read):</p>"
        body += _table(["true class", "predicted as", "images", "% of the true class"],
                       [(names[t], names[p], n, f"{100.0 * n / counts[present.index(t)]:.1f}")
                        for (t, p), n in top], numeric=(2, 3))
    return ReportSection("knn", "k-NN accuracy per class", body)


# --------------------------------------------------------------------------------------------------------------
# attention maps
# --------------------------------------------------------------------------------------------------------------


def _hwc(img: torch.Tensor) -> np.ndarray:
    from .transforms import to_float01

    return (to_float01(img).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def attention_figure(result, title: str, fmt: str = "uri"):
    """One image's attention heads, labelled (head index, Jaccard in percent, best head, legend), from an
    :class:`~dino_model.eval.attention_maps.AttentionResult`: a ``data:`` URI, or PNG bytes with ``fmt="png"``
    (the ``renderer`` of :func:`~dino_model.eval.attention_maps.davis_attention_scores`)."""
    scores = result.scores
    return figures.attention_heads(
        _hwc(result.image), result.attention.numpy(), result.masks.numpy(),
        result.foreground.numpy() if result.foreground is not None else None,
        [100.0 * v for v in scores.per_head] if scores else None,
        100.0 * scores.union if scores else None, title, fmt)


def attention_png(result, title: str) -> bytes:
    """:func:`attention_figure` as PNG bytes (the evaluation run's ``attention/<sequence>.png`` artifacts)."""
    return attention_figure(result, title, "png")


def _attention_figure(backbone, image: torch.Tensor, foreground, size, threshold, device, title: str) -> str:
    from .attention_maps import analyze_image

    return attention_figure(analyze_image(backbone, image, foreground, size, threshold, device), title)


def attention_section(backbone, davis_root, sequences: Sequence[str], frames: int = 3, frame_step: int = 10,
                      max_frames: int | None = None, size=480, threshold: float = 0.6,
                      device: str | torch.device = "cpu") -> ReportSection:
    """The attention heads on ``frames`` DAVIS frames (the first scored frame of each sequence, then the next
    scored ones), each head titled with its Jaccard against the ground-truth foreground."""
    from .davis_metrics import VOID_LABEL
    from .davis_propagation import load_sequence, read_frame, read_mask

    per_seq = []
    for name in sequences:
        seq = load_sequence(davis_root, name)
        pairs = [(f, a) for f, a in list(zip(seq.frames, seq.annotations))[: max_frames or None][::frame_step]
                 if a is not None]
        per_seq.append((name, pairs))
    chosen = []
    depth = 0
    while len(chosen) < frames and any(depth < len(p) for _, p in per_seq):
        for name, pairs in per_seq:
            if depth < len(pairs) and len(chosen) < frames:
                chosen.append((name, *pairs[depth]))
        depth += 1
    body = (f"<p>The [CLS] token's attention in the last block, per head, on {len(chosen)} DAVIS frame(s) (short "
            f"side {size} px). Each head's mask keeps the patches holding {threshold:.0%} of its attention mass; "
            "its Jaccard (J) is against the frame's ground-truth foreground (all objects). The attention scores "
            "of the evaluation average the best head's, the mean over heads and the union's J over all scored "
            "frames.</p>")
    for name, frame, ann in chosen:
        lab = read_mask(ann)
        fg = (lab > 0) & (lab != VOID_LABEL)
        body += _figure(_attention_figure(backbone, read_frame(frame), fg, size, threshold, device,
                                          f"{name} frame {frame.stem}"), f"attention heads, {name} frame {frame.stem}")
    return ReportSection("attention", "Attention maps per head", body)


def attention_images_section(backbone, images: Sequence[tuple[bytes, str]], size=224, threshold: float = 0.6,
                             device: str | torch.device = "cpu") -> ReportSection:
    """The attention heads on a few val images (no ground-truth masks: no Jaccard) when DAVIS did not run."""
    from dino_model.data.reader import decode_image

    body = (f"<p>The [CLS] token's attention in the last block, per head, on {len(images)} val image(s) (short "
            f"side {size} px); cyan outline: the patches holding {threshold:.0%} of the head's attention mass. "
            "These images have no object masks, so no Jaccard: run the evaluation with DAVIS for that.</p>")
    for data, text in images:
        body += _figure(_attention_figure(backbone, decode_image(data), None, size, threshold, device, text),
                        f"attention heads, {text}")
    return ReportSection("attention", "Attention maps per head", body)


# --------------------------------------------------------------------------------------------------------------
# DAVIS
# --------------------------------------------------------------------------------------------------------------


def davis_section(backbone, davis_root, sequence: str, config=None, max_frames: int | None = None, shown: int = 4,
                  device: str | torch.device = "cpu") -> ReportSection:
    """Label propagation on ``sequence`` (its first ``max_frames`` frames), ``shown`` frames from first to last
    with the ground-truth and the propagated masks and each frame's Jaccard."""
    from .attention_maps import jaccard
    from .davis_metrics import VOID_LABEL
    from .davis_propagation import load_sequence, propagate_sequence, read_frame, read_mask

    seq = load_sequence(davis_root, sequence)
    paths = seq.frames[: max_frames or None]
    n = len(paths)
    picks = sorted({round(i * (n - 1) / max(shown - 1, 1)) for i in range(min(shown, n))})
    out = []
    for i, pred in enumerate(propagate_sequence(backbone, (read_frame(p) for p in paths), seq.first_mask(), config,
                                                device)):
        if i not in picks:
            continue
        gt = read_mask(seq.annotations[i]) if seq.annotations[i] is not None else np.zeros_like(pred)
        valid = gt != VOID_LABEL
        j = 100.0 * jaccard((pred > 0) & valid, (gt > 0) & valid)
        out.append((_hwc(read_frame(paths[i])), gt, pred, paths[i].stem, j))
        if i >= picks[-1]:
            break
    body = (f"<p>Semi-supervised video object segmentation of <code>{_esc(sequence)}</code> ({n} frames): the "
            "first frame's mask is given, every later frame's is propagated from the backbone's patch features "
            "(the paper's label propagation). Top row: ground truth; bottom row: propagated masks. J: Jaccard of "
            "the foreground (all objects) on that frame.</p>")
    body += _figure(figures.davis_frames(out, f"{sequence}: ground truth (top) vs propagated (bottom)"),
                    f"DAVIS {sequence}")
    return ReportSection("davis", "DAVIS label propagation", body)


# --------------------------------------------------------------------------------------------------------------
# feature map
# --------------------------------------------------------------------------------------------------------------


def feature_map_section(val: Split, names: Sequence[str], max_points: int = 2000, seed: int = 0) -> ReportSection:
    """A t-SNE map (scikit-learn) of up to ``max_points`` val features (L2-normalised, a seeded random subset
    when there are more), one colour per class. Identical feature vectors (a collapsed backbone maps many or all
    images to one point) are embedded once and share their point."""
    from sklearn.manifold import TSNE

    n = len(val.labels)
    rows = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, False))
    x = F.normalize(torch.as_tensor(np.asarray(val.features[rows], dtype=np.float32)), dim=1).numpy()
    # Barnes-Hut t-SNE crashes on coincident points (a zero-size quadtree), so only distinct vectors are embedded
    unique, inverse = np.unique(x.round(6), axis=0, return_inverse=True)
    title = "Feature map (t-SNE)"
    if len(unique) < 5:
        collapsed = "; the backbone maps different images to the same features (collapsed)" \
            if len(unique) < len(rows) else ""
        return ReportSection("feature-map", title, f"<p>No map: the {len(rows)} val features take only "
                                                   f"{len(unique)} distinct value(s) (t-SNE needs at least 5)"
                                                   f"{collapsed}.</p>")
    perplexity = float(min(30.0, max(2.0, (len(unique) - 1) / 3.0)))
    method = "exact" if len(unique) < 200 else "barnes_hut"
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", method=method,
                    random_state=seed).fit_transform(unique)
    points = embedded[inverse.reshape(-1)]
    shared = f" {len(rows) - len(unique)} of them repeat another's features exactly." if len(unique) < len(rows) else ""
    body = (f"<p>t-SNE (scikit-learn, perplexity {perplexity:.0f}, seed {seed}) of {len(rows)} val features"
            f"{'' if n <= max_points else f' (a random {max_points} of {n})'}, L2-normalised, one colour per class: "
            "images of a class that cluster together are the ones a k-NN classifies well. Distances between "
            f"clusters mean little in t-SNE.{shared}</p>")
    body += _figure(figures.feature_map(points, val.labels[rows], names, "val features, t-SNE"), "feature map")
    return ReportSection("feature-map", title, body)


# --------------------------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px}
header,section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 24px;margin-bottom:20px}
h1{font-size:1.5em;margin:0 0 8px} h2{font-size:1.2em;margin:0 0 12px;border-bottom:1px solid #d0d7de;padding-bottom:6px}
nav a{margin-right:14px;color:#0969da;text-decoration:none} nav a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:8px 0;font-size:.92em} th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0} img{max-width:100%;height:auto;border:1px solid #eaeef2} figcaption{color:#57606a;font-size:.85em}
code{background:#f6f8fa;padding:1px 4px;border-radius:4px} .facts td:first-child{color:#57606a;white-space:nowrap}
"""


def render_report(title: str, facts: Sequence[tuple[str, str]], sections: Sequence[ReportSection]) -> str:
    """The self-contained HTML page: a header (title, facts, links to the sections) and the sections."""
    nav = "".join(f'<a href="#{s.id}">{_esc(s.title)}</a>' for s in sections)
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in facts)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header id="top"><h1>{_esc(title)}</h1><table class="facts">{rows}</table>',
        f"<p>Written by dino-pipeline, {made}. Self-contained: every figure is inside this file.</p>",
        f"<nav>{nav}</nav></header>",
    ]
    parts += [f'<section id="{s.id}"><h2>{_esc(s.title)}</h2>{s.html}</section>' for s in sections]
    parts.append("</main></body></html>")
    return "\n".join(parts)
