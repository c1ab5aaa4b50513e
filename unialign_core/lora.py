"""LoRA files in diffusers' SD3 key format, with alpha keys.

Keys: `transformer.<module>.lora_A.weight` [r, in], `transformer.<module>.lora_B.weight` [out, r]
and `transformer.<module>.alpha` (a scalar). The scale is alpha / rank when an alpha key exists,
else 1.0 -- the rule ComfyUI applies, so both read a file at the same strength.

`lora_deltas` returns weight deltas keyed by the transformer's parameter names; callers add
them to a copy (or hand them to ComfyUI's ModelPatcher), so the base model never changes.
"""

import re
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .checkpoint import read_safetensors, save_safetensors_atomic
from .errors import CheckpointError

PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
# `<module>.lora_A.weight`, `<module>.lora_B.weight` (peft names an adapter between: `lora_A.default.weight`) and
# `<module>.alpha`.
LORA_KEY = re.compile(r"^(.*)\.(?:lora_(A|B)(?:\.([^.]+))?\.weight|(alpha))$")
SLOTS = {"A": "down", "B": "up"}


class LoraLayer(NamedTuple):
    down: torch.Tensor  # lora_A [rank, in]
    up: torch.Tensor  # lora_B [out, rank]
    alpha: Optional[float]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def lora_key(key: str, adapter_names: bool = False) -> Optional[Tuple[str, str]]:
    """(module, slot) of a LoRA tensor's key: slot "down" (lora_A), "up" (lora_B) or "alpha"; None for another key.

    `adapter_names` also reads peft's names, which put the adapter between (`<module>.lora_A.default.weight`)."""
    m = LORA_KEY.match(key)
    if m is None or (m.group(3) is not None and not adapter_names):
        return None
    return m.group(1), SLOTS[m.group(2)] if m.group(2) else "alpha"


def parse_lora(state: Dict[str, torch.Tensor], path: str) -> Dict[str, LoraLayer]:
    """Group a LoRA state dict by module name (prefix stripped)."""
    parts: Dict[str, dict] = {}
    for key, value in state.items():
        name = key
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        found = lora_key(name)
        if found is None:
            raise CheckpointError(path, f"not a diffusers-format LoRA: unexpected key {key!r}")
        module, slot = found
        parts.setdefault(module, {})[slot] = value
    if not parts:
        raise CheckpointError(path, "empty LoRA file")
    layers = {}
    for module, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise CheckpointError(path, f"LoRA layer {module!r} lacks lora_A or lora_B")
        if p["down"].shape[0] != p["up"].shape[1]:
            raise CheckpointError(path, f"LoRA layer {module!r}: rank of lora_A and lora_B differ")
        alpha = float(p["alpha"]) if "alpha" in p else None
        layers[module] = LoraLayer(p["down"], p["up"], alpha)
    return layers


def load_lora(path: str) -> Dict[str, LoraLayer]:
    """Read a LoRA .safetensors file."""
    return parse_lora(read_safetensors(path)[0], path)


def lora_deltas(
    transformer: torch.nn.Module, layers: Dict[str, LoraLayer], strength: float, path: str = "LoRA"
) -> Dict[str, torch.Tensor]:
    """Weight deltas `strength * scale * up @ down`, keyed `<module>.weight`, checked against the model."""
    params = dict(transformer.named_parameters())
    deltas = {}
    for module, layer in layers.items():
        key = f"{module}.weight"
        if key not in params:
            raise CheckpointError(path, f"LoRA targets {module!r}, which this model does not have")
        weight = params[key]
        shape = (layer.up.shape[0], layer.down.shape[1])
        if tuple(weight.shape) != shape:
            raise CheckpointError(path, f"LoRA for {module!r} is {shape}, the model's weight is {tuple(weight.shape)}")
        delta = (layer.up.float() @ layer.down.float()) * (layer.scale * strength)
        deltas[key] = delta.to(weight.dtype)
    return deltas


def merge_lora(transformer: torch.nn.Module, layers: Dict[str, LoraLayer], strength: float, path: str = "LoRA") -> int:
    """Add a LoRA's deltas to the transformer's weights in place (checked first: nothing changes on a mismatch);
    returns the number of layers merged."""
    deltas = lora_deltas(transformer, layers, strength, path)
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            params[key].add_(delta.to(params[key].device, params[key].dtype))
    return len(deltas)


def save_lora(path: str, layers: Dict[str, LoraLayer], metadata: Optional[Dict[str, str]] = None) -> str:
    """Write layers in diffusers' SD3 format with alpha keys (atomically)."""
    tensors = {}
    for module, layer in layers.items():
        tensors[f"transformer.{module}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = layer.up.contiguous()
        alpha = layer.alpha if layer.alpha is not None else float(layer.down.shape[0])
        tensors[f"transformer.{module}.alpha"] = torch.tensor(alpha)
    return save_safetensors_atomic(tensors, path, metadata)
