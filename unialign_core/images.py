"""Image inputs for the modes: tensors [B, 3, H, W] in [0, 1], or PIL images."""

from typing import List, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import InputError, InputTypeError

ImageInput = Union[torch.Tensor, Image.Image, Sequence[Image.Image]]
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # PIL modes with an alpha channel
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def on_white(image, dim: int = 1):
    """Alpha composited on white: the one rule for every image with transparency (inference and training).

    A tensor in [0, 1] whose axis `dim` holds the colour channels then alpha -> the colour channels,
    `colour * alpha + (1 - alpha)`. A PIL image -> an RGB PIL image: alpha composited on white (palette
    transparency counts as alpha), 16-bit grayscale (e.g. depth maps) scaled to 8 bits, other modes converted."""
    if isinstance(image, torch.Tensor):
        channels = image.shape[dim]
        colour, alpha = image.narrow(dim, 0, channels - 1), image.narrow(dim, channels - 1, 1)
        return colour * alpha + (1 - alpha)
    if image.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode; alpha is composited on white) as [1, 3, H, W] in [0, 1]."""
    array = np.asarray(on_white(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_tensor(images: ImageInput, name: str = "image") -> torch.Tensor:
    """Normalise an image input to a float tensor [B, 3, H, W] in [0, 1]."""
    if isinstance(images, Image.Image):
        return pil_to_tensor(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError(name, "got an empty list of images")
        tensors = [to_tensor(i, name) for i in images]
        sizes = {tuple(t.shape[-2:]) for t in tensors}
        if len(sizes) > 1:
            raise InputError(name, f"images in one batch must share a size, got {sorted(sizes)}")
        return torch.cat(tensors)
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(name, f"expected a tensor [B,3,H,W] or PIL image, got {type(images).__name__}")
    x = images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise InputError(name, f"expected shape [B, 3, H, W], got {tuple(images.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = on_white(x, dim=1)
    return x.float().clamp(0, 1)


def check_size(width: int, height: int, multiple: int, name: str = "image") -> None:
    """Raise InputError(name) unless both sides are positive multiples of `multiple`."""
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        fit = lambda v: max(multiple, round(v / multiple) * multiple)  # noqa: E731
        raise InputError(
            name,
            f"size {width}x{height} is not a multiple of {multiple}; "
            f"resize or crop it, e.g. to {fit(width)}x{fit(height)}",
        )


def resize_to_area(images: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """Resize [B, 3, H, W] to about side x side pixels in area, keeping the aspect ratio,
    with both sides multiples of `multiple` (antialiased bilinear)."""
    h, w = images.shape[-2:]
    scale = (side * side / (h * w)) ** 0.5
    new_h = max(multiple, round(h * scale / multiple) * multiple)
    new_w = max(multiple, round(w * scale / multiple) * multiple)
    if (new_h, new_w) == (h, w):
        return images
    out = torch.nn.functional.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True)
    return out.clamp(0, 1)


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """[B, 3, H, W] in [0, 1] to PIL images."""
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def check_fits(width: int, height: int, limit: int, multiple: int, name: str = "image") -> None:
    """Raise InputError(name) when a side is longer than `limit` pixels, the most the model's learned
    position table covers (`pos_embed_max_size` patches; 3072 px for the released model)."""
    if width <= limit and height <= limit:
        return
    scale = limit / max(width, height)
    fit = lambda v: max(multiple, int(v * scale) // multiple * multiple)  # noqa: E731
    raise InputError(
        name,
        f"size {width}x{height} is larger than this model allows (its position table covers at most "
        f"{limit}x{limit} pixels); scale it down, e.g. to {fit(width)}x{fit(height)}",
    )


def resize_and_crop(images: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """The official understanding preprocessing: scale the shorter side to `side` (rounded to a multiple),
    then crop the centre to side x side (antialiased bilinear)."""
    side = max(multiple, round(side / multiple) * multiple)
    h, w = images.shape[-2:]
    scale = side / min(h, w)
    new_h, new_w = max(side, round(h * scale)), max(side, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = torch.nn.functional.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    return images[..., top : top + side, left : left + side].clamp(0, 1)
