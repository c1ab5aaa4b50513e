"""Flow-matching Euler sampling for the image stream.

The time grid comes from the checkpoint's FlowMatchEulerDiscreteScheduler config (shift,
dynamic shifting), exactly as the published pipeline sets it; the Euler update
`x <- x + (sigma_next - sigma) * v` is done in float32.
"""

from typing import Callable, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .errors import Cancelled, InputError

# velocity_fn(latents [B,C,h,w], timestep [B] on the 0..1000 scale) -> velocity [B,C,h,w]
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dynamic_shift_mu(image_seq_len: int, config: dict) -> float:
    """The resolution-dependent shift SD3 uses when `use_dynamic_shifting` is on (linear in sequence length)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flow_sigmas(scheduler_config: dict, steps: int, image_seq_len: int) -> torch.Tensor:
    """The `steps + 1` noise levels, from ~1 down to 0, for this checkpoint's scheduler."""
    if steps < 1:
        raise InputError("steps", f"must be at least 1, got {steps}", sep=" ")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kwargs = {}
    if scheduler.config.use_dynamic_shifting:
        kwargs["mu"] = dynamic_shift_mu(image_seq_len, scheduler_config)
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    return scheduler.sigmas.float()


def check_cancel(cancel: Optional[Callable[[], bool]]) -> None:
    """Call the caller's cancel check; it may return True or raise its own exception."""
    if cancel is not None and cancel():
        raise Cancelled("sampling cancelled")


def sample_flow(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Integrate from noise `latents` along `sigmas` with Euler steps.

    `callback(step, total, x0)` is called after every step with the current clean-image estimate.
    """
    total = len(sigmas) - 1
    x = latents
    for i in range(total):
        check_cancel(cancel)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        timestep = (sigma * 1000).expand(x.shape[0]).to(x.device)
        v = velocity_fn(x, timestep)
        x_float = x.float()
        x = (x_float + (sigma_next - sigma) * v.float()).to(latents.dtype)
        if callback is not None:
            callback(i + 1, total, (x_float - sigma * v.float()).to(latents.dtype))
    return x
