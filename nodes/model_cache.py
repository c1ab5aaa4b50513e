"""The model under ComfyUI's model management: the dtype choices, the ModelPatchers that load and offload the
weights (in part on small GPUs), and the cache that reuses a loaded model while its files and dtypes stay the same.
"""

import contextlib
import logging
import time
import weakref

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

from ..unialign_core import DTYPES, load_model
from .model_files import file_signature

log = logging.getLogger("UniAlignment")

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
# How the transformer's block weights are stored ("default": in the compute dtype); computed in the dtype above.
WEIGHT_DTYPES = {
    "default": None,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}
WEIGHT_DTYPE_CHOICES = list(WEIGHT_DTYPES)


def choose_dtype(choice: str, device=None) -> torch.dtype:
    """auto: what ComfyUI would pick for an SD3-class model on this device (default: ComfyUI's; fp32 on the CPU)."""
    device = mm.get_torch_device() if device is None else device
    if choice in DTYPES:
        return DTYPES[choice]
    if torch.device(device).type == "cpu":
        return torch.float32
    supported = [torch.bfloat16, torch.float16, torch.float32]
    try:
        return mm.unet_dtype(device=device, supported_dtypes=supported)
    except TypeError:  # a ComfyUI whose unet_dtype takes fewer arguments
        return mm.unet_dtype()


def output_device():
    """Where ComfyUI wants node outputs (IMAGE, LATENT)."""
    return mm.intermediate_device()


def operations_for(weight_dtype) -> type:
    """ComfyUI's layer classes for our linear layers: ComfyUI can load them in part (lowvram) and stream the
    rest. manual_cast when weights are stored in another dtype than they compute in (fp8), as ComfyUI does."""
    return comfy.ops.manual_cast if weight_dtype is not None else comfy.ops.disable_weight_init


# Where the transformer's weights sit in the ModelPatcher's model: where every ComfyUI model keeps its diffusion
# model, so ComfyUI's LoRA key map (diffusion_model.*, lora_unet_*) and key-patch filters cover it.
TRANSFORMER_PREFIX = "diffusion_model."


class UniAlignWeights(torch.nn.Module):
    """The transformer and the VAE in one module, so that one ModelPatcher manages them together.

    Keys: diffusion_model.* (the transformer, its diffusers SD3 module names), vae.*; LoRA patches use
    diffusion_model.<parameter name>. T5 has its own patcher."""

    def __init__(self, model):
        super().__init__()
        self.add_module(TRANSFORMER_PREFIX[:-1], model.transformer)
        self.vae = model.vae

    @property
    def transformer(self):
        """The transformer as registered (the native MODEL's `diffusion_model` may show an object patch instead)."""
        return self._modules[TRANSFORMER_PREFIX[:-1]]

    def get_dtype(self):
        return self.transformer.pos_embed.proj.weight.dtype


class TextEncoderWeights(torch.nn.Module):
    """T5 alone (keys text_encoder.*), for its own ModelPatcher: ComfyUI can unload it once a prompt is encoded."""

    def __init__(self, model):
        super().__init__()
        self.text_encoder = model.text_encoder
        self._dtype = model.dtype

    def get_dtype(self):
        return self._dtype


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def place_unmanaged(patcher) -> int:
    """Move the tensors a partial load leaves behind but that do not cast per call to the load device.

    ComfyUI's partial (lowvram) load keeps some comfy.ops layers on the offload device and casts their
    weights per call; those are left alone. Every other tensor (norms, embeddings, the position table, the
    VAE) must be on the compute device: plain torch layers are loaded whole. Returns how many were moved."""
    device = torch.device(patcher.load_device)
    moved = 0
    for module in patcher.model.modules():
        if getattr(module, "comfy_cast_weights", False):
            continue
        for param in module.parameters(recurse=False):
            if not same_device(param.device, device):
                param.data = param.data.to(device)
                moved += 1
        for name, buffer in module.named_buffers(recurse=False):
            if not same_device(buffer.device, device):
                module._buffers[name] = buffer.to(device)
                moved += 1
    return moved


def streamed_layers(patcher) -> list:
    """The names of the layers ComfyUI loaded in part: they stay on the offload device, cast per call."""
    return [n for n, m in patcher.model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]


class UniAlignHandle:
    """What a UNIALIGN_MODEL wire carries: the model, the ModelPatcher of its transformer and VAE (with the
    LoRAs applied), and the ModelPatcher of its T5."""

    def __init__(self, model, patcher, key, name, loras=(), t5_patcher=None):
        self.model = model
        self.patcher = patcher
        self.t5_patcher = t5_patcher
        self.key = key
        self.name = name
        self.loras = tuple(loras)
        self._preview_factors = None

    def with_patcher(self, patcher, lora):
        """The same model with another patcher of its transformer and VAE, and one more (name, strength) LoRA."""
        clone = UniAlignHandle(self.model, patcher, self.key, self.name, self.loras + (lora,), self.t5_patcher)
        clone._preview_factors = self._preview_factors
        return clone

    def _load(self, patchers):
        mm.load_models_gpu(patchers)
        for patcher in patchers:
            place_unmanaged(patcher)

    def activate(self, text_encoder_each_step: bool = True):
        """Load the weights (with this handle's patches) onto the compute device; return the model.

        The linear layers are comfy.ops layers, so on a GPU too small for the model ComfyUI loads part of
        them and streams the rest (lowvram) instead of failing. text_encoder_each_step (understanding) loads
        T5 with the transformer, for every step. Otherwise (the image modes) T5 is loaded only around each
        T5 call and the transformer is asked for again after it: T5 is then not required, and ComfyUI
        unloads it whenever it needs the memory."""
        if text_encoder_each_step:
            self.model.text_encoder_scope = None
            self._load([self.t5_patcher, self.patcher])
        else:
            self.model.text_encoder_scope = self._text_encoder_scope
            self._load([self.patcher])
        return self.model

    @contextlib.contextmanager
    def _text_encoder_scope(self):
        self._load([self.t5_patcher])
        try:
            yield
        finally:
            self._load([self.patcher])  # T5 not named: ComfyUI may unload it from now on

    def preview_factors(self):
        if self._preview_factors is None:
            self._preview_factors = self.model.fit_latent_rgb()
        return self._preview_factors

    def __repr__(self):
        loras = "".join(f" + {n}@{s:g}" for n, s in self.loras)
        return f"UniAlignHandle({self.name}{loras})"


_cache = weakref.WeakValueDictionary()  # every handle still alive somewhere (ComfyUI's node cache)
_last = {}  # and the last one loaded, kept alive


def load_handle(name, model_path, text_encoder_path, vae_path, dtype, weight_dtype=None) -> UniAlignHandle:
    """Load (or reuse) a model. The cache key covers the paths, their contents' stamps and the dtypes.

    The linear layers of the transformer and T5 are built from ComfyUI's comfy.ops (partial loading);
    weight_dtype (fp8) stores the transformer's block weights in it, computing in `dtype`."""
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    key = (
        model_path, file_signature(model_path), text_encoder_path, file_signature(text_encoder_path),
        vae_path, file_signature(vae_path), str(dtype), str(weight_dtype), str(load_device),
    )  # fmt: skip
    handle = _cache.get(key)
    if handle is not None:
        log.info("[UniAlign] reusing the loaded model %s (%s)", name, dtype)
        _last["handle"] = handle
        return handle
    _last.clear()  # let a model nobody uses any more go before loading the next
    started = time.monotonic()
    model = load_model(
        model_path,
        text_encoder=text_encoder_path,
        vae=vae_path,
        device=offload_device,
        dtype=dtype,
        weight_dtype=weight_dtype,
        operations=operations_for(weight_dtype),
    )
    patcher = comfy.model_patcher.ModelPatcher(
        UniAlignWeights(model), load_device=load_device, offload_device=offload_device
    )
    t5_patcher = comfy.model_patcher.ModelPatcher(
        TextEncoderWeights(model), load_device=load_device, offload_device=offload_device
    )
    handle = UniAlignHandle(model, patcher, key, name, t5_patcher=t5_patcher)
    _cache[key] = handle
    _last["handle"] = handle
    stored = f", block weights {weight_dtype}" if weight_dtype is not None else ""
    log.info("[UniAlign] loaded model %s (%s%s) in %.1f s", name, dtype, stored, time.monotonic() - started)
    return handle
