"""Aspect buckets and the images resized to them: decoding (EXIF rotation, RGB on white), cover-resize and crop,
and the float tensor the encoders take."""

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from unialign_core.images import on_white


def make_buckets(resolution=512, step=16, max_aspect=2.0):
    """(w, h) buckets of about resolution**2 pixels, sides multiples of `step` (itself a multiple of 16),
    aspect ratios up to `max_aspect` both ways; sorted from tallest to widest, the square one included."""
    if step % 16 or step <= 0:
        raise ValueError(f"step must be a positive multiple of 16, got {step}")
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    for h in range(step, resolution + 1, step):
        w = round(area / h / step) * step
        if w >= h and w / h <= max_aspect:
            buckets |= {(w, h), (h, w)}
    return sorted(buckets, key=lambda b: b[0] / b[1])


def pick_bucket(width, height, buckets):
    """The bucket whose aspect ratio is closest to width/height (in log space)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def to_rgb(img):
    """RGB copy of a PIL image: alpha composited on white, grayscale / palette / 16-bit converted (the core's
    rule, `unialign_core.images.on_white`, which the modes apply to their PIL inputs too)."""
    return on_white(img)


def load_image(path):
    """Decode an image file fully (raises on a missing or corrupt file), apply EXIF rotation, return RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def image_size(path):
    """(width, height) from the file header only, after EXIF rotation (no pixel decode)."""
    with Image.open(path) as img:
        w, h = img.size
        if img.format == "PNG":  # PNG getexif() would decode the pixels; use an eXIf chunk seen before them
            exif = Image.Exif()
            if img.info.get("exif"):
                exif.load(img.info["exif"])
        else:
            exif = img.getexif()
        if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return w, h


def resize_to_bucket(img, bucket, crop=(0.5, 0.5)):
    """Resize to cover `bucket` (w, h) keeping the aspect ratio, then crop; crop=(fx, fy) in [0, 1] places the
    window (0.5, 0.5 = centre crop)."""
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    x, y = round(crop[0] * (nw - bw)), round(crop[1] * (nh - bh))
    return img.crop((x, y, x + bw, y + bh))


def image_to_tensor(img):
    """PIL RGB image -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
