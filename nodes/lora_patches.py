"""A LoRA as ComfyUI weight patches on a clone of the model's ModelPatcher: the base weights never change."""

import torch

from ..unialign_core import CheckpointError, load_lora, lora_deltas
from ..unialign_core.errors import check_finite
from .image_types import InputError, core_inputs
from .model_cache import TRANSFORMER_PREFIX, UniAlignHandle
from .model_files import client_path, file_signature

_cache = {}  # the deltas of the last LoRA applied, by file, its stamp and the model


def with_lora(handle: UniAlignHandle, lora_name: str, lora_path: str, strength: float) -> UniAlignHandle:
    """A new handle whose patcher is a clone of the input's plus the LoRA's weight deltas.

    ComfyUI patches the weights when this clone is loaded and restores them when another clone (e.g. the
    base) is loaded next. The patch value `(delta,)` is the plain weight difference every ComfyUI version
    understands."""
    with core_inputs({"strength": "strength"}):  # NaN passes ComfyUI's min/max check and would blacken the image
        check_finite("strength", strength)
    key = (lora_path, file_signature(lora_path), handle.key, handle.loras)
    deltas = _cache.get(key)
    if deltas is None:
        try:
            layers = load_lora(lora_path)
            deltas = lora_deltas(
                _ComputeDtypeView(handle.model.transformer, handle.model.dtype), layers, 1.0, lora_path
            )
        except CheckpointError as e:
            raise InputError("lora_name", client_path(f"{lora_name!r} does not fit this model: {e.problem}")) from None
        deltas = {TRANSFORMER_PREFIX + k: v.to(handle.patcher.offload_device) for k, v in deltas.items()}
        _cache.clear()
        _cache[key] = deltas
    patcher = handle.patcher.clone()
    patched = patcher.add_patches({k: (v,) for k, v in deltas.items()}, strength)
    if len(patched) != len(deltas):
        missing = sorted(set(deltas) - {k if isinstance(k, str) else k[0] for k in patched})
        raise InputError("lora_name", f"{lora_name!r}: ComfyUI could not patch {missing[:5]}")
    return handle.with_patcher(patcher, (lora_name, strength))


class _ComputeDtypeView:
    """The transformer's parameter shapes with fp8 ones shown in the compute dtype, so that LoRA deltas are
    made in that dtype (an fp8 delta would flush a LoRA's small values to zero); ComfyUI adds them in fp32."""

    def __init__(self, transformer, dtype):
        self.transformer, self.dtype = transformer, dtype

    def named_parameters(self):
        for name, p in self.transformer.named_parameters():
            low = p.is_floating_point() and p.element_size() == 1
            yield name, torch.empty(p.shape, dtype=self.dtype, device="meta") if low else p
