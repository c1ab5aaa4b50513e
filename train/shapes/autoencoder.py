"""A small VAE for the shapes world (stage 2 of ``python -m train.shapes``).

diffusers' ``AutoencoderKL`` with 16 latent channels (like SD3's, so the transformer's shapes are the real ones)
and two encoder blocks: a 32 px image becomes a 16 x 16 x 16 latent (downsample x2). With patch size 2 that is
64 image tokens, 8 per side, so a shape (about 10 px) spans two to three tokens and the three positions fall on
different token columns. (At x4 a whole image was 16 tokens, a shape about one, and the VAE alone read back only
0.57 of held-out scenes whole after 600 steps, against 0.885 at x2: see the report's diagnosis.) The loss is L1 + MSE on pixels plus a small KL term;
the latent shift and scale (``shift_factor``, ``scaling_factor``) are then measured on the data so the
transformer sees latents of mean 0 and variance 1, as with SD3's VAE.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from unialign_core.vae import posterior

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 16,
    "sample_size": 32,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
    "force_upcast": False,
}


def dataset_images(jsonl_paths) -> torch.Tensor:
    """Every distinct image (sources and targets) of native JSONL files, as uint8 [N, 3, H, W]."""
    seen, arrays = set(), []
    for path in jsonl_paths:
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                for rel in rec.get("sources", []) + ([rec["target"]] if rec.get("target") else []):
                    with Image.open(os.path.join(base, rel)) as img:
                        arr = np.asarray(img.convert("RGB"))
                    key = arr.tobytes()
                    if key not in seen:
                        seen.add(key)
                        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def make_vae(**overrides) -> AutoencoderKL:
    """A fresh VAE of ``VAE_CONFIG`` (with overrides)."""
    return AutoencoderKL(**dict(VAE_CONFIG, **overrides))


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator=None) -> tuple[torch.Tensor, dict]:
    """(loss, parts) for a batch of pixels in [-1, 1]."""
    dist = vae.encode(pixels).latent_dist
    z = dist.sample(generator)
    recon = vae.decode(z).sample
    l1 = (recon - pixels).abs().mean()
    mse = F.mse_loss(recon, pixels)
    kl = dist.kl().mean() / z[0].numel()  # per latent element
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(mean, std) of the posterior means over ``images`` (uint8 [N, 3, H, W])."""
    means = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 127.5 - 1
        means.append(vae.encode(x).latent_dist.mean)
    z = torch.cat(means)
    return float(z.mean()), float(z.std())


def train_vae(
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-3,
    seed: int = 0,
    progress=None,
    config: dict | None = None,
) -> tuple[AutoencoderKL, dict]:
    """Train a VAE on uint8 images [N, 3, H, W]; returns (vae in eval mode with its latent scaling set, stats).

    ``progress(step, parts)`` is called after every step. The learning rate decays with a cosine to 5 %.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = make_vae(**(config or {})).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s / max(steps, 1), 1.0)))
    )
    parts = {}
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[idx].float() / 127.5 - 1
        if torch.rand((), generator=generator) < 0.5:  # the world is mirror-symmetric up to naming
            x = x.flip(-1)
        loss, parts = vae_loss(vae, x, kl_weight, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, parts)
    vae.eval().requires_grad_(False)
    mean, std = latent_statistics(vae, images)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return vae, dict(parts, latent_mean=mean, latent_std=std, steps=steps, batch_size=batch_size, images=len(images))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mean) and decode float pixels [B, 3, H, W] in [0, 1]."""
    z = posterior(vae, pixels).mean
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
