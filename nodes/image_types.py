"""Conversions between ComfyUI's types and unialign_core's: images, latents, and the core's input errors.
Torch only, no ComfyUI import.

ComfyUI IMAGE: float [B, H, W, C] in 0..1 (C is 3; other packs sometimes give 1, 2 or 4).
unialign_core images: float [B, 3, H, W] in 0..1.
ComfyUI LATENT for SD3 models: {"samples": z} with z the raw VAE latent; the model works on
(z - shift) * scale, which is what unialign_core's latents are.
Input checks (sizes, empty prompts, ...) are the core's: its InputError names the argument, and `core_inputs`
turns it into the node's InputError naming the node's input.
"""

import contextlib

import torch

try:
    from ..unialign_core.errors import InputError as CoreInputError
    from ..unialign_core.images import on_white
except ImportError:  # loaded by path, outside the pack (the unit tests): the core is importable by name
    from unialign_core.errors import InputError as CoreInputError
    from unialign_core.images import on_white


class InputError(ValueError):
    """A node input is wrong. The message starts with the input's name."""

    def __init__(self, name: str, problem: str):
        self.input_name = name
        super().__init__(f"{name}: {problem}")


@contextlib.contextmanager
def core_inputs(names: dict):
    """Inside, a unialign_core InputError about an argument in `names` (the core's argument name -> the node's
    input name, e.g. {"reference 2": "reference_3"}) is raised as the node's InputError naming that input, with
    the core's problem text. Other errors pass unchanged."""
    try:
        yield
    except CoreInputError as e:
        if e.name not in names:
            raise
        raise InputError(names[e.name], e.problem) from None


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


def latent_to_comfy(latents: torch.Tensor, model, device) -> dict:
    """Scaled model latents -> ComfyUI LATENT {"samples": raw VAE latents} (SD3 latent format); `model`: the
    UniAlignModel whose VAE made them (it owns the scaling)."""
    raw = model.unscale_latents(latents.detach().float())
    return {"samples": raw.to(device)}
