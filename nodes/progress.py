"""ComfyUI's progress bar, latent previews and Cancel for unialign_core's `callback` and `cancel` arguments."""

import logging

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import latent_preview  # ComfyUI's top-level module
from comfy.cli_args import LatentPreviewMethod, args

from .preview import latent_to_rgb_image

log = logging.getLogger("UniAlignment")


def cancel():
    """Raises ComfyUI's interrupt exception when the user pressed Cancel (or /interrupt was posted)."""
    mm.throw_exception_if_processing_interrupted()
    return False


def _make_previewer(handle):
    """A function latents -> ComfyUI preview tuple, or None when previews are off."""
    sd3 = getattr(comfy.latent_formats, "SD3", None)  # ComfyUI has SD3 support since June 2024
    if sd3 is not None:
        previewer = latent_preview.get_previewer(handle.patcher.load_device, sd3())
        if previewer is None:
            return None
        return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0.float())
    # ComfyUI without SD3 support: our own linear latent -> RGB fit.
    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    factors = handle.preview_factors()
    size = getattr(latent_preview, "MAX_PREVIEW_RESOLUTION", 512)
    return lambda x0: ("JPEG", latent_to_rgb_image(x0, factors), size)


class Progress:
    """The `callback(step, total, state)` for unialign_core: a ComfyUI progress bar with previews."""

    def __init__(self, handle=None, previews=True):
        self.bar = None
        self.total = None
        self.previewer = _make_previewer(handle) if (previews and handle is not None) else None

    def __call__(self, step, total, state=None):
        if self.bar is None or total != self.total:
            self.bar = comfy.utils.ProgressBar(total)
            self.total = total
        preview = None
        if self.previewer is not None and isinstance(state, torch.Tensor) and state.is_floating_point():
            try:
                preview = self.previewer(state)
            except Exception as e:  # a preview must never stop sampling
                log.warning("[UniAlign] preview failed, previews off for this run: %s", e)
                self.previewer = None
        self.bar.update_absolute(step, total, preview)
