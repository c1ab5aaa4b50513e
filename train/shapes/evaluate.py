"""Read the shapes world back from pixels and score each mode (no learned model, fixed thresholds).

Pipeline of ``read_blobs``: the background is the median colour of the image border (read as the nearest
named background). Every pixel is unmixed against that background and each shape colour
(``shape_labels``), so blurred edge pixels go to the shape when at least half of them is shape colour. Each
shape colour is split into 4-connected components, and every component of at least ``MIN_BLOB_FRACTION``
of the image is a blob. A blob's position is the column of its centroid, its size comes from its bounding
box, and its kind is: triangle when it widens downwards (``taper``), else the symmetric kind (circle, square,
cross) whose ideal mask, stretched to the blob's bounding box, overlaps it best (IoU).

Images may be PIL images, uint8 arrays [H, W, 3], float arrays/tensors [H, W, 3] or [3, H, W] in [0, 1]
(a leading batch dimension of 1 is dropped).
"""

from __future__ import annotations

import argparse
import re
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from .world import BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, Scene, Shape, coverage, render, sample_scene

MAX_COLOUR_DIST = 90.0  # RGB distance from the background-to-colour segment beyond which a pixel is no colour
MIN_ALPHA = 0.5  # share of shape colour (vs background) from which a pixel belongs to the shape
MIN_BLOB_FRACTION = 0.006  # components smaller than this fraction of the image are ignored (6 px at 32 px)
LARGE_MIN_EXTENT = 0.25  # bounding-box side / image side at or above this reads as "large" (0.3 vs 0.2)
TRIANGLE_MIN_TAPER = 0.3  # bottom-minus-top width share above which a blob is a triangle (others ~0)
FLOAT_RANGE_MAX = 1.5  # float images whose maximum is at most this are taken to be on the 0..1 scale
EDGE_THRESHOLD = 127.5  # grey level separating edge from non-edge pixels

_SHAPE_RGB = np.asarray([COLOURS[c] for c in COLOURS], dtype=np.float32)


@dataclass
class Blob:
    """A connected region of one shape colour, with what it reads as."""

    shape: Shape
    area: int
    centroid: tuple  # (x, y) in pixels


# ------------------------------------------------------------------------------------------------ input


def to_array(img) -> np.ndarray:
    """Any supported image to a float32 [H, W, 3] array on the 0..255 scale (uint8 and floats > 1.5 as 0..255)."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    if hasattr(img, "detach"):  # torch tensor
        img = img.detach().cpu().float().numpy()
    arr = np.asarray(img)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    unit_scale = arr.dtype != np.uint8 and arr.max(initial=0) <= FLOAT_RANGE_MAX
    arr = arr.astype(np.float32) * (255.0 if unit_scale else 1.0)
    return np.clip(arr, 0, 255)


def to_gray(img) -> np.ndarray:
    """Any supported image to a float32 [H, W] grey array on the 0..255 scale."""
    return to_array(img).mean(axis=-1)


# -------------------------------------------------------------------------------------------- reading


def border_colour(arr: np.ndarray) -> np.ndarray:
    """Median RGB of the image border (shapes cover little of it)."""
    pixels = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return np.median(pixels, axis=0)


def nearest_background(rgb: np.ndarray) -> str:
    """Name of the background colour nearest to an RGB value."""
    dists = [np.linalg.norm(rgb - np.asarray(BACKGROUNDS[b], dtype=np.float32)) for b in BACKGROUNDS]
    return list(BACKGROUNDS)[int(np.argmin(dists))]


def shape_labels(arr: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel, the index of its shape colour, or -1 for background / no palette colour.

    Each pixel is unmixed as ``background + alpha * (colour - background)`` for every shape colour; the colour
    with the smallest residual wins, and the pixel is that colour when ``alpha >= MIN_ALPHA`` and the residual
    is within ``MAX_COLOUR_DIST``. A blurred edge pixel is thus assigned by coverage, like the renderer does.
    """
    offsets = _SHAPE_RGB - background[None]  # [C, 3]
    rel = arr[:, :, None, :] - background  # [H, W, 1, 3]
    alpha = np.clip((rel * offsets).sum(-1) / (offsets * offsets).sum(-1), 0, 1)  # [H, W, C]
    residual = np.linalg.norm(rel - alpha[..., None] * offsets, axis=-1)
    best = residual.argmin(axis=-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    ok = (best_alpha >= MIN_ALPHA) & (residual.min(axis=-1) <= MAX_COLOUR_DIST)
    return np.where(ok, best, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks (min-label propagation)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    return [lab == v for v in np.unique(lab[mask])]


def taper(crop: np.ndarray) -> float:
    """(mean width of the bottom third of rows - that of the top third) / box width; ~0.67 for a triangle."""
    h, w = crop.shape
    third = max(h // 3, 1)
    widths = crop.sum(axis=1)
    return float((widths[-third:].mean() - widths[:third].mean()) / w)


def classify_kind(mask: np.ndarray) -> str:
    """Triangle when the blob widens downwards (``taper``), else the symmetric kind with the best IoU.

    The IoU is against the kind's ideal mask stretched to the blob's bounding box.
    """
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if taper(crop) >= TRIANGLE_MIN_TAPER:
        return "triangle"
    best, best_iou = None, -1.0
    for kind in KINDS:
        if kind == "triangle":
            continue
        ideal = ideal_mask(kind, *crop.shape)
        iou = (ideal & crop).sum() / max((ideal | crop).sum(), 1)
        if iou > best_iou:
            best, best_iou = kind, iou
    return best


@lru_cache(maxsize=4096)
def ideal_mask(kind: str, h: int, w: int) -> np.ndarray:
    """[h, w] bool mask of a kind filling an h x w box (cached; do not modify)."""
    mask = coverage(kind, w / 2, h / 2, w / 2, h / 2, h, w) >= 0.5
    mask.flags.writeable = False
    return mask


def position_of(x: float, width: int) -> str:
    """Named column of an x coordinate."""
    column = min(int(x * len(POSITIONS) / width), len(POSITIONS) - 1)
    return POSITIONS[max(column, 0)]


def read_blobs(img) -> tuple[str, list[Blob]]:
    """(background name, blobs sorted by area, largest first) read from an image."""
    arr = to_array(img)
    h, w = arr.shape[:2]
    background = border_colour(arr)
    labels = shape_labels(arr, background)
    min_area = MIN_BLOB_FRACTION * h * w
    blobs = []
    for index, colour in enumerate(COLOURS):
        mask = labels == index
        if mask.sum() < min_area:
            continue
        for comp in components(mask):
            area = int(comp.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(comp)
            extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(h, w)
            size = "large" if extent >= LARGE_MIN_EXTENT else "small"
            shape = Shape(classify_kind(comp), colour, position_of(xs.mean() + 0.5, w), size)
            blobs.append(Blob(shape, area, (float(xs.mean() + 0.5), float(ys.mean() + 0.5))))
    blobs.sort(key=lambda b: -b.area)
    return nearest_background(background), blobs


def read_scene(img) -> Scene:
    """The scene an image shows, as read from its pixels."""
    background, blobs = read_blobs(img)
    return Scene(background, tuple(b.shape for b in blobs))


# -------------------------------------------------------------------------------------------- scoring


def score_t2i(img, scene: Scene) -> dict:
    """Per attribute, whether every intended shape is right: {colour, shape, position, background}.

    For each intended shape the largest blob of its colour is taken; ``colour`` is True when such a blob
    exists for every shape, ``shape``/``position`` when those blobs also have the intended kind/position.
    """
    background, blobs = read_blobs(img)
    found = [next((b.shape for b in blobs if b.shape.colour == s.colour), None) for s in scene.shapes]
    return {
        "colour": all(f is not None for f in found),
        "shape": all(f is not None and f.kind == s.kind for f, s in zip(found, scene.shapes)),
        "position": all(f is not None and f.position == s.position for f, s in zip(found, scene.shapes)),
        "background": background == scene.background,
    }


def scene_facts(scene: Scene) -> set:
    """A scene as a set of facts: its background and (colour, kind, position) per shape (size ignored)."""
    return {("background", scene.background)} | {(s.colour, s.kind, s.position) for s in scene.shapes}


def score_compose(img, scene: Scene) -> dict:
    """Compose outputs are scored like text-to-image against the target scene."""
    return score_t2i(img, scene)


def score_edit(src_scene: Scene, out_img, target_scene: Scene, edit_meta: dict | None = None) -> dict:
    """{changed, kept} for an edit output.

    ``changed``: every fact that the edit introduces (target minus source) is read from the output and no
    fact that it removes (source minus target) is. ``kept``: every fact shared by source and target is read
    and the output has as many shapes as the target. ``edit_meta`` is accepted for reference; the facts come
    from the two scenes.
    """
    del edit_meta
    read = scene_facts(read_scene(out_img))
    src, tgt = scene_facts(src_scene), scene_facts(target_scene)
    n_read = sum(1 for e in read if e[0] != "background")
    return {
        "changed": (tgt - src) <= read and not ((src - tgt) & read),
        "kept": (src & tgt) <= read and n_read == len(target_scene.shapes),
    }


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    p = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def edge_f1(pred_edge_img, true_edge_img, tolerance: int = 1) -> float:
    """F1 of edge pixels, a predicted pixel counting as right within ``tolerance`` px of a true one (and back)."""
    true = to_gray(true_edge_img) > EDGE_THRESHOLD
    pred = to_gray(pred_edge_img) > EDGE_THRESHOLD
    if pred.shape != true.shape:  # a resized pixel is an edge when any edge pixel falls in it
        resized = Image.fromarray(pred.astype(np.uint8) * 255).resize(true.shape[::-1], Image.BOX)
        pred = np.asarray(resized) > 0
    if not true.any() and not pred.any():
        return 1.0
    if not true.any() or not pred.any():
        return 0.0
    precision = (pred & _dilate(true, tolerance)).sum() / pred.sum()
    recall = (true & _dilate(pred, tolerance)).sum() / true.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def depth_mae(pred_depth_img, true_depth_img) -> float:
    """Mean absolute error of two depth-like maps on the 0..1 scale (grey level)."""
    true = to_gray(true_depth_img)
    pred = to_gray(pred_depth_img)
    if pred.shape != true.shape:
        pred = np.asarray(Image.fromarray(pred.astype(np.uint8)).resize(true.shape[::-1], Image.BILINEAR), np.float32)
    return float(np.abs(pred - true).mean() / 255.0)


# ---------------------------------------------------------------------------------------------- texts

_POSITION_WORDS = {"left": "left", "right": "right", "center": "center", "centre": "center", "middle": "center"}
_BACKGROUND_WORDS = {"black": "black", "gray": "gray", "grey": "gray"}


def parse_caption(text: str) -> Scene | None:
    """Shapes (colour + kind, then the next position word) and background named in a caption, or None.

    A kind word takes the last shape colour since the previous kind word, "small" in that span marks a
    small shape, and the first position word after it (before the next kind word) is its position.
    Returns None when no background or no complete shape is found.
    """
    words = re.findall(r"[a-z]+", text.lower())
    kind_at = [i for i, w in enumerate(words) if w in KINDS]
    background = next((_BACKGROUND_WORDS[w] for w in words if w in _BACKGROUND_WORDS), None)
    shapes = []
    for n, i in enumerate(kind_at):
        before = words[(kind_at[n - 1] + 1 if n else 0) : i]
        after = words[i + 1 : kind_at[n + 1] if n + 1 < len(kind_at) else len(words)]
        colour = next((w for w in reversed(before) if w in COLOURS), None)
        position = next((_POSITION_WORDS[w] for w in after if w in _POSITION_WORDS), None)
        if colour is None or position is None:
            return None
        shapes.append(Shape(words[i], colour, position, "small" if "small" in before else "large"))
    if background is None or not shapes:
        return None
    return Scene(background, tuple(shapes))


def score_caption(text: str, scene: Scene) -> dict:
    """{colour, shape, position, background, all} for a caption of ``scene``.

    Each true shape is matched to the parsed shape of the same colour; ``all`` is colour, shape and position
    all right with exactly as many shapes mentioned as there are.
    """
    parsed = parse_caption(text)
    if parsed is None:
        return {"colour": False, "shape": False, "position": False, "background": False, "all": False}
    found = [next((p for p in parsed.shapes if p.colour == s.colour), None) for s in scene.shapes]
    scores = {
        "colour": all(f is not None for f in found),
        "shape": all(f is not None and f.kind == s.kind for f, s in zip(found, scene.shapes)),
        "position": all(f is not None and f.position == s.position for f, s in zip(found, scene.shapes)),
        "background": parsed.background == scene.background,
    }
    same_count = len(parsed.shapes) == len(scene.shapes)
    scores["all"] = scores["colour"] and scores["shape"] and scores["position"] and same_count
    return scores


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def score_vqa(answer: str, truth: str) -> bool:
    """Exact match after ``normalise_answer`` on both sides."""
    return normalise_answer(answer) == normalise_answer(truth)


# ------------------------------------------------------------------------------------------ self check


def degrade(img: Image.Image, blur: float = 0.6, noise: float = 8.0, seed: int = 0) -> Image.Image:
    """Gaussian blur (radius in px at 32 px, scaled with the image) plus gaussian noise (std in 0..255 units)."""
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(blur * img.width / 32)), np.float32)
    arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def self_check(
    n: int = 300, size: int = 32, blur: float = 0.6, noise: float = 8.0, seed: int = 0, sizes=("large",)
) -> dict:
    """Share of random scenes read back exactly from clean and from degraded renders."""
    rng = np.random.default_rng(seed)
    truths = [sample_scene(rng, sizes=sizes) for _ in range(n)]
    clean = np.mean([read_scene(render(s, size)) == s for s in truths])
    degraded = np.mean([read_scene(degrade(render(s, size), blur, noise, i)) == s for i, s in enumerate(truths)])
    return {
        "n": n,
        "size": size,
        "blur": blur,
        "noise": noise,
        "sizes": list(sizes),
        "clean": float(clean),
        "degraded": float(degraded),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Evaluator read-back accuracy on random shapes-world renders.")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--blur", type=float, default=0.6)
    parser.add_argument("--noise", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="also sample small shapes")
    args = parser.parse_args()
    sizes = SIZES if args.small else ("large",)
    print(self_check(args.n, args.size, args.blur, args.noise, args.seed, sizes))
