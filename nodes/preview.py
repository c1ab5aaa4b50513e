"""A latent -> RGB preview for ComfyUI versions without SD3 support (before June 2024).

Newer ComfyUI previews SD3 latents itself (`latent_formats.SD3`). For older ones the model fits a linear map
from its latents to RGB with its own VAE (`UniAlignModel.fit_latent_rgb`, in the core); this turns latents
into the small preview image with that map. Torch only, no ComfyUI import.
"""

import torch
from PIL import Image


def latent_to_rgb_image(latents: torch.Tensor, factors: torch.Tensor) -> Image.Image:
    """First latent of a batch [B, C, h, w] (scaled model latents) as a small RGB image."""
    x = latents[0].detach().float().cpu().permute(1, 2, 0)
    rgb = x @ factors[:-1] + factors[-1]
    array = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
