"""The rules a host sampler (ComfyUI's KSampler and friends) needs to run UniAlignment's image stream itself.

No ComfyUI here: `nodes/native.py` translates these into ComfyUI's types. The modes (`modes.py`) run their own
loop; a host sampler instead asks, per step, for one model call, which is `velocity`. What the two must agree on:

- the time grid: `flow_shift` is the shift of the checkpoint's FlowMatchEulerDiscreteScheduler (the constant a
  host's flow model sampling takes, ComfyUI's ModelSamplingSD3), and `native_sigmas` the modes' own grid for a
  given shift (ComfyUI's "normal" scheduler gives the same grid for a static shift);
- the model call: `velocity` is what `modes._generate` calls (target latents, T5 states, timestep sigma*1000,
  condition latents appended as extra image tokens);
- the prompts: `encode_prompt` pads and cuts as the modes do (`model.text_length` T5 tokens, <pad> padding) and
  returns `modes.prompt_notes` for the user;
- the condition images: `condition_latents` encodes edit sources and references as `edit`/`compose` do (the
  posterior sampled with a generator seeded like theirs).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .flow_sampler import dynamic_shift_mu, flow_sigmas
from .images import ImageInput
from .modes import _check_prompt, _generator, _source_latents, check_image_size, prompt_notes, trained_side

# How many condition images one prompt may carry: an edit source, or up to 3 references (compose)
MAX_CONDITIONS = 3


def image_seq_len(model, width: int, height: int) -> int:
    """The number of image tokens of a width x height (pixels) image."""
    cell = model.pixel_multiple
    return (height // cell) * (width // cell)


def flow_shift(scheduler_config: dict, seq_len: Optional[int] = None) -> float:
    """The constant time shift of the checkpoint's scheduler: its `shift`, or, for a scheduler with dynamic
    shifting, exp(mu) at `seq_len` image tokens (the shift its exponential time shift amounts to there)."""
    if scheduler_config.get("use_dynamic_shifting", False):
        if seq_len is None:
            raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting); give seq_len")
        return math.exp(dynamic_shift_mu(seq_len, scheduler_config))
    return float(scheduler_config.get("shift", 1.0))


def default_shift(model) -> float:
    """The shift a host's model sampling starts with: the scheduler's, or for a dynamic scheduler its shift at
    the trained size (`modes.trained_side`)."""
    side = trained_side(model)
    return flow_shift(model.scheduler_config, image_seq_len(model, side, side))


def native_sigmas(scheduler_config: dict, steps: int, seq_len: int, shift: Optional[float] = None) -> torch.Tensor:
    """The `steps + 1` noise levels the modes use (`flow_sigmas`), with the scheduler's shift replaced by a
    constant `shift` when one is given (e.g. set by the host's ModelSamplingSD3)."""
    config = dict(scheduler_config)
    if shift is not None:
        config.update(shift=float(shift), use_dynamic_shifting=False)
    return flow_sigmas(config, steps, seq_len)


def velocity(model, latents, context, timestep, conditions: Optional[Sequence[torch.Tensor]] = None):
    """One image-stream call as the modes make it: latents [B, C, h, w] (scaled, the model's dtype), T5 states
    [B, L, D], timestep [B] on the 0..1000 scale, condition latents (scaled) each [B, C, h', w']. Returns the
    velocity (noise - image) [B, C, h, w]."""
    conditions = list(conditions) if conditions else None
    return model.transformer(latents, context, timestep, conditions, compute_text=False).velocity


def encode_prompt(model, text: str, name: str = "prompt", text_length: Optional[int] = None):
    """(T5 states [1, L, D] on the CPU, notes): one prompt encoded as the image modes encode it, and what to tell
    the user about it (`modes.prompt_notes`: an end cut at the model's token limit, text T5 cannot read).
    An empty text is allowed (the published negative prompt is "")."""
    notes = prompt_notes(model, text, name, text_length)
    states = model.encode_prompts([text], text_length)
    return states.float().cpu(), notes


def check_prompt(text: str, name: str = "prompt") -> str:
    """A positive prompt must say something (the modes' rule)."""
    return _check_prompt(text, name)


def condition_latents(
    model, images: Sequence[ImageInput], seed: int, names: Optional[Sequence[str]] = None
) -> Tuple[List[torch.Tensor], torch.Generator]:
    """Scaled latents of condition images as `edit` (one source, a batch edits each) and `compose` (each
    reference one image) make them: in order, each VAE posterior sampled from one generator seeded with `seed`.
    Returns them on the CPU (float32) and the generator, which `edit`/`compose` go on to draw the noise from."""
    if not 1 <= len(images) <= MAX_CONDITIONS:
        raise ValueError(f"give 1 to {MAX_CONDITIONS} condition images, got {len(images)}")
    names = list(names) if names else [f"image {i + 1}" for i in range(len(images))]
    generator = _generator(seed)
    latents = []
    for image, name in zip(images, names):
        latents.append(_source_latents(model, image, name, generator).float().cpu())
    return latents, generator


def edit_noise(model, source_latents: torch.Tensor, generator: torch.Generator, num_images: int = 1):
    """The initial noise `edit` draws after encoding its source (with the generator `condition_latents`
    returned): [B * num_images, C, h, w]."""
    shape = (source_latents.shape[0] * num_images,) + tuple(source_latents.shape[1:])
    return torch.randn(shape, generator=generator)


def initial_noise(seed: int, shape: Sequence[int], condition_shapes: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """The initial noise [shape] the modes draw for `seed`: after one VAE posterior sample per condition image
    batch (`condition_latents`, shapes in order), when there are any. Without conditions it is
    `torch.randn(shape)` from a generator seeded with `seed`, which is also ComfyUI's KSampler noise."""
    generator = _generator(seed)
    for condition in condition_shapes:
        torch.randn(tuple(condition), generator=generator)  # what the VAE sample of that image drew
    return torch.randn(tuple(shape), generator=generator)


__all__ = [
    "MAX_CONDITIONS",
    "check_image_size",
    "check_prompt",
    "condition_latents",
    "default_shift",
    "edit_noise",
    "encode_prompt",
    "flow_shift",
    "initial_noise",
    "image_seq_len",
    "native_sigmas",
    "velocity",
]
