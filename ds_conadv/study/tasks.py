"""Procedurally generated classification tasks for the reproduction study (no downloads).

Every task is a pure function of its seed: ``make_task(name, seed)`` returns a :class:`Task` with fixed train /
validation / test splits (float32 images in [0, 1] shaped (N, 1, H, W), or int64 token ids (N, L)).

The tasks are built so that memorising the training set is easy and generalising is not: few training examples
(2K) and strong nuisance variation (position, scale, rotation, stroke width, contrast, background noise,
clutter; for the token task filler and decoy tokens around an order-sensitive phrase). That is the regime in
which the large-batch generalisation gap shows up at a fixed epoch budget (for the image tasks; the token task
shows none, see docs/reproduction.md).

* ``shapes``  — 10 outline/filled geometric shapes, 16x16, drawn from signed distance functions.
* ``digits``  — scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16 under random affine
  transforms, noise and an occluding blob; the writers' images are split *before* rendering, so a test image
  never shares its source digit with a training image.
* ``phrases`` — token sequences (length 32, vocabulary 64, 8 classes): each class has two ordered two-token
  phrases over a shared pool of 16 content tokens; a sequence holds one phrase of its class, adjacent and in
  order, and one more content token elsewhere among filler. The tokens alone are ambiguous (the same tokens form
  other classes' phrases in the other order or with other partners), so the model has to use order and position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["Task", "make_task", "TASKS", "TASK_SIZES", "TASK_KINDS"]


@dataclass
class Task:
    name: str
    kind: str                   # "image" or "tokens"
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab: int = 0              # tokens only
    input_range: Optional[Tuple[float, float]] = (0.0, 1.0)

    def sizes(self) -> Dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


#: default (train, val, test) sizes
TASK_SIZES = {"shapes": (2048, 1000, 3000), "digits": (2048, 1000, 3000), "phrases": (2048, 1000, 3000)}
#: "image" or "tokens" per task
TASK_KINDS = {"shapes": "image", "digits": "image", "phrases": "tokens"}
_SIZE = 16


# ----------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------
def _shape_sdf(kind: int, u: np.ndarray, v: np.ndarray, stroke: float) -> np.ndarray:
    """Signed distance (negative inside) of shape ``kind`` in its own unit frame (radius about 1)."""
    r = np.sqrt(u ** 2 + v ** 2)
    box = np.maximum(np.abs(u), np.abs(v))
    if kind == 0:                                   # filled disc
        return r - 0.9
    if kind == 1:                                   # ring
        return np.abs(r - 0.75) - stroke
    if kind == 2:                                   # filled square
        return box - 0.8
    if kind == 3:                                   # hollow square
        return np.abs(box - 0.75) - stroke
    if kind == 4:                                   # plus
        return np.minimum(np.maximum(np.abs(u) - stroke, np.abs(v) - 0.9),
                          np.maximum(np.abs(v) - stroke, np.abs(u) - 0.9))
    if kind == 5:                                   # X
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return np.minimum(np.maximum(np.abs(a) - stroke, np.abs(b) - 0.95),
                          np.maximum(np.abs(b) - stroke, np.abs(a) - 0.95))
    if kind == 6:                                   # filled triangle (apex up)
        return np.maximum(np.maximum(-v - 0.7, 0.866 * u + 0.5 * v - 0.45), -0.866 * u + 0.5 * v - 0.45)
    if kind == 7:                                   # two horizontal bars
        return np.maximum(np.abs(np.abs(v) - 0.5) - stroke, np.abs(u) - 0.9)
    if kind == 8:                                   # L shape
        return np.minimum(np.maximum(np.abs(u + 0.7) - stroke, np.abs(v) - 0.9),
                          np.maximum(np.abs(v - 0.7) - stroke, np.abs(u) - 0.9))
    if kind == 9:                                   # T shape
        return np.minimum(np.maximum(np.abs(u) - stroke, np.abs(v) - 0.9),
                          np.maximum(np.abs(v + 0.7) - stroke, np.abs(u) - 0.9))
    raise ValueError(kind)


def _clutter(rng: np.ndarray, n: int, grid: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A few faint random line segments per image (nuisance strokes)."""
    yy, xx = grid
    out = np.zeros((n, _SIZE, _SIZE), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            p = rng.uniform(0, _SIZE, 2)
            ang = rng.uniform(0, np.pi)
            d = np.array([np.cos(ang), np.sin(ang)])
            length = rng.uniform(3, 8)
            t = np.clip((xx - p[0]) * d[0] + (yy - p[1]) * d[1], 0, length)
            dist = np.sqrt((xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2)
            out[i] = np.maximum(out[i], rng.uniform(0.2, 0.5) * np.clip(1.2 - dist, 0, 1))
    return out


def _shapes(n: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32) + 0.5
    imgs = np.empty((n, _SIZE, _SIZE), np.float32)
    for i in range(n):
        scale = rng.uniform(3.5, 6.5)
        cx, cy = rng.uniform(_SIZE / 2 - 3.5, _SIZE / 2 + 3.5, 2)
        ang = rng.uniform(-0.45, 0.45)
        c, s = np.cos(ang), np.sin(ang)
        dx, dy = (xx - cx) / scale, (yy - cy) / scale
        u, v = c * dx + s * dy, -s * dx + c * dy
        stroke = rng.uniform(0.12, 0.3)
        sdf = _shape_sdf(int(y[i]), u, v, stroke) * scale        # in pixels
        imgs[i] = np.clip(0.5 - sdf, 0, 1) * rng.uniform(0.45, 1.0)
    imgs = np.maximum(imgs, _clutter(rng, n, (yy, xx)))
    imgs += rng.uniform(0.0, 0.25, (n, 1, 1)) * rng.random((n, _SIZE, _SIZE), dtype=np.float32)
    imgs += rng.uniform(-0.1, 0.2, (n, 1, 1))                     # brightness offset
    return np.clip(imgs, 0, 1)[:, None], y


# ----------------------------------------------------------------------------------------------------------
# digits (scikit-learn's bundled 8x8 digits)
# ----------------------------------------------------------------------------------------------------------
def _render_digits(src: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` renders of randomly chosen source digits (8x8 in [0, 1]) under random affine maps, on 16x16."""
    import torch.nn.functional as F
    idx = rng.integers(0, len(src), n)
    x = torch.from_numpy(src[idx]).float()[:, None]                       # (n, 1, 8, 8)
    ang = torch.from_numpy(rng.uniform(-0.35, 0.35, n)).float()
    scale = torch.from_numpy(rng.uniform(0.75, 1.25, n)).float()         # > 1: digit smaller than the canvas
    shear = torch.from_numpy(rng.uniform(-0.25, 0.25, n)).float()
    shift = torch.from_numpy(rng.uniform(-0.25, 0.25, (n, 2))).float()
    c, s = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([c * scale, (-s + shear) * scale, shift[:, 0]], 1),
                         torch.stack([s * scale, c * scale, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, _SIZE, _SIZE), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).numpy()
    out = out * rng.uniform(0.5, 1.0, (n, 1, 1, 1))
    yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32)
    # an occluding blob (background-coloured) on half of the images
    for i in np.nonzero(rng.random(n) < 0.5)[0]:
        p = rng.uniform(2, _SIZE - 2, 2)
        out[i, 0] *= np.clip(((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / rng.uniform(3, 8), 0, 1)
    out = np.maximum(out, _clutter(rng, n, (yy + 0.5, xx + 0.5))[:, None] * 0.8)
    out += rng.uniform(0.0, 0.3, (n, 1, 1, 1)) * rng.random(out.shape, dtype=np.float32)
    return np.clip(out, 0, 1).astype(np.float32), labels[idx]


def _digits_sources(seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(10_000 + seed).permutation(len(y))
    n_tr, n_va = int(0.5 * len(y)), int(0.15 * len(y))
    parts = order[:n_tr], order[n_tr:n_tr + n_va], order[n_tr + n_va:]
    return [(x[p], y[p]) for p in parts]


# ----------------------------------------------------------------------------------------------------------
# phrases (token sequences)
# ----------------------------------------------------------------------------------------------------------
_VOCAB, _LEN, _NCLS, _PHRASES, _CONTENT, _DECOYS = 64, 32, 8, 2, 16, 1


def _phrase_table(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The content token ids (16) and the (classes, phrases, 2) ordered phrases over them (no phrase shared)."""
    rng = np.random.default_rng(30_000 + seed)
    content = rng.permutation(_VOCAB)[:_CONTENT]
    pairs = [(int(a), int(b)) for a in content for b in content if a != b]
    chosen = rng.choice(len(pairs), _NCLS * _PHRASES, replace=False)
    return content, np.array([pairs[i] for i in chosen]).reshape(_NCLS, _PHRASES, 2)


def _phrases(n: int, rng: np.random.Generator, content: np.ndarray, table: np.ndarray):
    """Filler tokens, one phrase of the class at a random place and ``_DECOYS`` content tokens elsewhere; any
    other class's phrase the decoys form by chance is broken up (the label stays unambiguous)."""
    filler = np.setdiff1d(np.arange(_VOCAB), content)
    other = {(int(a), int(b)): c for c in range(_NCLS) for a, b in table[c]}
    y = rng.integers(0, _NCLS, n)
    x = filler[rng.integers(0, len(filler), (n, _LEN))]
    for i in range(n):
        p = int(rng.integers(0, _LEN - 1))
        x[i, p:p + 2] = table[y[i], rng.integers(0, _PHRASES)]
        free = np.setdiff1d(np.arange(_LEN), [p, p + 1])
        x[i, rng.choice(free, _DECOYS, replace=False)] = rng.choice(content, _DECOYS)
        for j in range(_LEN - 1):
            if j != p and other.get((int(x[i, j]), int(x[i, j + 1])), y[i]) != y[i]:
                x[i, j + 1 if j + 1 not in (p, p + 1) else j] = filler[rng.integers(0, len(filler))]
    return x, y


# ----------------------------------------------------------------------------------------------------------
def make_task(name: str, seed: int = 0, sizes: Optional[Tuple[int, int, int]] = None) -> Task:
    """The task ``name`` with data seed ``seed`` (the same seed gives the same splits bit for bit)."""
    if name not in TASK_SIZES:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASK_SIZES)}")
    n_tr, n_va, n_te = sizes or TASK_SIZES[name]
    rng = np.random.default_rng(seed * 7919 + sum(map(ord, name)))
    if name == "shapes":
        parts = [_shapes(n, rng) for n in (n_tr, n_va, n_te)]
        kind, ncls, vocab = "image", 10, 0
    elif name == "digits":
        srcs = _digits_sources(seed)
        parts = [_render_digits(sx, sy, n, rng) for (sx, sy), n in zip(srcs, (n_tr, n_va, n_te))]
        kind, ncls, vocab = "image", 10, 0
    else:
        content, table = _phrase_table(seed)
        parts = [_phrases(n, rng, content, table) for n in (n_tr, n_va, n_te)]
        kind, ncls, vocab = "tokens", _NCLS, _VOCAB
    t = [torch.from_numpy(np.ascontiguousarray(a)) for part in parts for a in part]
    t = [a.long() if i % 2 == 1 or kind == "tokens" else a.float() for i, a in enumerate(t)]
    return Task(name, kind, ncls, *t, vocab=vocab, input_range=(0.0, 1.0) if kind == "image" else None)


TASKS = tuple(TASK_SIZES)
