"""Conversions between ComfyUI's data types and unialign_core's. Torch only, no ComfyUI import.

ComfyUI IMAGE: float [B, H, W, C] in 0..1 (C is 3; other packs sometimes give 1, 2 or 4).
unialign_core images: float [B, 3, H, W] in 0..1.
ComfyUI LATENT for SD3 models: {"samples": z} with z the raw VAE latent; the model works on
(z - shift) * scale, which is what unialign_core's latents are.
"""

import torch

try:
    from ..unialign_core.images import on_white
except ImportError:  # loaded by path, outside the pack (the unit tests): the core is importable by name
    from unialign_core.images import on_white


class InputError(ValueError):
    """A node input is wrong. The message starts with the input's name."""

    def __init__(self, name: str, problem: str):
        self.input_name = name
        super().__init__(f"{name}: {problem}")


def image_to_core(image: torch.Tensor, name: str) -> torch.Tensor:
    """ComfyUI IMAGE -> [B, 3, H, W] in 0..1: grayscale is repeated, alpha is composited on white."""
    if not isinstance(image, torch.Tensor):
        raise InputError(name, f"expected an IMAGE tensor, got {type(image).__name__}")
    x = image
    if x.ndim == 3:  # one image without a batch axis
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise InputError(name, f"expected an IMAGE [batch, height, width, channels], got shape {tuple(image.shape)}")
    if x.shape[0] == 0:
        raise InputError(name, "the image batch is empty")
    x = x.float().clamp(0, 1)
    channels = x.shape[-1]
    if channels in (2, 4):  # gray+alpha or RGBA: composite on white
        x = on_white(x, dim=-1)
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x.movedim(-1, 1).contiguous()


def image_from_core(images: torch.Tensor, device) -> torch.Tensor:
    """[B, 3, H, W] -> ComfyUI IMAGE [B, H, W, 3] (float32, on `device`)."""
    return images.detach().movedim(1, -1).float().clamp(0, 1).contiguous().to(device)


def check_multiple(name: str, width: int, height: int, multiple: int, what: str = "size") -> None:
    """Raise InputError naming the input unless both sides are positive multiples of `multiple`."""
    if width > 0 and height > 0 and width % multiple == 0 and height % multiple == 0:
        return
    fit = lambda v: max(multiple, round(v / multiple) * multiple)  # noqa: E731
    raise InputError(
        name,
        f"{what} {width}x{height} is not a multiple of {multiple} (this model needs multiples of {multiple}); "
        f"resize or crop it, e.g. to {fit(width)}x{fit(height)} (ImageScale / Upscale Image does that)",
    )


def check_side(name: str, value: int, multiple: int) -> None:
    """A width or height widget: a positive multiple of `multiple`."""
    if value > 0 and value % multiple == 0:
        return
    fit = max(multiple, round(value / multiple) * multiple)
    raise InputError(
        name, f"{value} is not a multiple of {multiple} (this model needs multiples of {multiple}); try {fit}"
    )


def check_text(name: str, text: str, hint: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(name, f"must not be empty; {hint}")
    return text


def latent_to_comfy(latents: torch.Tensor, model, device) -> dict:
    """Scaled model latents -> ComfyUI LATENT {"samples": raw VAE latents} (SD3 latent format); `model`: the
    UniAlignModel whose VAE made them (it owns the scaling)."""
    raw = model.unscale_latents(latents.detach().float())
    return {"samples": raw.to(device)}
