"""The SD3 VAE: loading from a diffusers folder or a single file, and the latent scaling.

The model's latents are the VAE's latents shifted and scaled by its config (`scale_latents`, with pixels in
[-1, 1]; `unscale_latents` undoes it).
"""

import os
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from .checkpoint import load_into, read_safetensors, read_weights_folder
from .errors import Cancelled, CheckpointError

# The SD3 VAE (stable-diffusion-3-medium `vae/config.json`), used for single files without a config.
SD3_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
LDM_MARKERS = ("encoder.down.0.", "first_stage_model.", "vae.encoder.down.")


def _clean_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def vae_from_state_dict(state: dict, config: dict, path: str, dtype: torch.dtype) -> AutoencoderKL:
    """Build an AutoencoderKL from diffusers- or LDM-layout weights; the config is checked first (the loader's
    `check_vae_config`: only entries the VAE takes, sizes within the loader's bounds)."""
    from .loader import check_vae_config  # the loader owns the bounds (it imports this module)

    config = _clean_config(check_vae_config(config, path))
    try:
        with torch.device("meta"):
            vae = AutoencoderKL(**config)
    except Exception as e:  # diffusers' own checks, e.g. a block type it does not know
        raise CheckpointError(path, f"the VAE config is not usable: {e}") from None
    if any(k.startswith(LDM_MARKERS) for k in state):
        state = convert_ldm_vae_checkpoint(state, config)
    return load_into(vae, state, path, "VAE", dtype).eval().requires_grad_(False)


def load_vae(path: str, dtype: torch.dtype = torch.float32, config: Optional[dict] = None) -> AutoencoderKL:
    """Load a VAE from a diffusers folder (`config.json` + weights) or a single .safetensors file.

    A single file takes its config from, in order: the `config` argument, a `config`
    entry in its metadata, a `<name>.json` or `config.json` beside it, or the SD3 VAE config.
    """
    # the loader owns the config checks (it imports this module)
    from .loader import check_vae_config, metadata_json, read_json

    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(path, "no config.json in this VAE folder")
        config = check_vae_config(read_json(config_path, "the VAE's settings"), config_path)
        return vae_from_state_dict(read_weights_folder(path, "diffusion_pytorch_model"), config, path, dtype)
    state, metadata = read_safetensors(path)
    if config is None and "config" in metadata:
        config = metadata_json(metadata, "config", path, "the VAE's settings")
    for sibling in (os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(path), "config.json")):
        if config is None and os.path.isfile(sibling):
            config = read_json(sibling, "the VAE's settings")
    return vae_from_state_dict(state, config or SD3_VAE_CONFIG, path, dtype)


def scale_latents(raw: torch.Tensor, config) -> torch.Tensor:
    """Raw VAE latents -> the model's latents: `(z - shift_factor) * scaling_factor` (the one place of the rule;
    `UniAlignModel.scale_latents` is the model's spelling). `config`: the VAE's config."""
    return (raw - config.shift_factor) * config.scaling_factor


def unscale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """The model's latents -> raw VAE latents, the inverse of `scale_latents`."""
    return latents / config.scaling_factor + config.shift_factor


def posterior(vae: AutoencoderKL, pixels: torch.Tensor):
    """The VAE's posterior (raw, unscaled latents) of pixels [B, 3, H, W] in [0, 1], which it reads as [-1, 1]."""
    return vae.encode(pixels.to(vae.device, vae.dtype) * 2 - 1).latent_dist


def encode(vae: AutoencoderKL, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [0, 1] to scaled latents, sampling the posterior as published."""
    dist = posterior(vae, pixels)
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device="cpu").to(dist.mean)
    return scale_latents(z, vae.config)


@torch.no_grad()
def encode_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of the posterior mean (no sampling noise)."""
    return scale_latents(posterior(vae, pixels).mean, vae.config)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to pixels [B, 3, H, W] in [0, 1]."""
    z = unscale_latents(latents.to(vae.device, vae.dtype), vae.config)
    return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)


# The VAE's blocks before each of which `cancellable` checks for a cancel (encode and decode alike).
CANCEL_POINTS = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D")


@contextmanager
def cancellable(vae: torch.nn.Module, cancel: Optional[Callable[[], bool]]):
    """While inside, the caller's `cancel()` is checked before every ResNet, attention, down- and upsampling
    block of the VAE, so that Cancel reaches a long encode or decode within one block. It returns True to stop
    (raises `Cancelled`) or raises its own exception. The numbers are unchanged: nothing is tiled."""
    if cancel is None:
        yield
        return

    def check(module, args):
        if cancel():
            raise Cancelled("VAE cancelled")

    handles = [m.register_forward_pre_hook(check) for m in vae.modules() if type(m).__name__ in CANCEL_POINTS]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
