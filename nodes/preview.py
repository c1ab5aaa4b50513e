"""A latent -> RGB preview for ComfyUI versions without SD3 support (before June 2024).

Newer ComfyUI previews SD3 latents itself (`latent_formats.SD3`). For older ones this fits a
linear map from the model's latents to RGB with the model's own VAE: a few smooth random colour
images are encoded (posterior means), their pixels averaged down to the latent grid, and a
least-squares fit maps latent vectors (plus a bias) to RGB. Torch only, no ComfyUI import.
"""

import torch
import torch.nn.functional as F
from PIL import Image


def fit_latent_rgb(model, images: int = 8, seed: int = 0) -> torch.Tensor:
    """A [C + 1, 3] matrix: `[latent, 1] @ W` approximates the pixels (in -1..1) of a latent cell."""
    generator = torch.Generator("cpu").manual_seed(seed)
    side = model.pixel_multiple * 4
    colours = torch.rand(images, 3, 4, 4, generator=generator)
    pixels = F.interpolate(colours, size=(side, side), mode="bilinear", align_corners=False)
    latents = encode_mean(model.vae, pixels).float().cpu()
    target = F.adaptive_avg_pool2d(pixels * 2 - 1, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution


@torch.no_grad()
def encode_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of the posterior mean (no sampling noise, which would blur the fit)."""
    x = pixels.to(vae.device, vae.dtype) * 2 - 1
    mean = vae.encode(x).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def latent_to_rgb_image(latents: torch.Tensor, factors: torch.Tensor) -> Image.Image:
    """First latent of a batch [B, C, h, w] (scaled model latents) as a small RGB image."""
    x = latents[0].detach().float().cpu().permute(1, 2, 0)
    rgb = x @ factors[:-1] + factors[-1]
    array = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
