"""The T5 encoder: loading from a folder or a single file, fp8 weights, and the mask-token row.

ComfyUI users already have `models/text_encoders/t5xxl_fp16.safetensors` or
`t5xxl_fp8_e4m3fn.safetensors` (Hugging Face T5 encoder key layout). fp8 weights stay
fp8 in memory and each linear layer upcasts its weight when it computes.
"""

import os
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import T5Config, T5EncoderModel

from .checkpoint import load_into, load_torch_tensor, read_safetensors, read_weights_folder
from .errors import CheckpointError
from .transformer import use_operations

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# Prefixes some single files put before the Hugging Face T5 keys.
KNOWN_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "text_encoder.")


class UpcastLinear(nn.Module):
    """A linear layer that keeps a low-precision (fp8) weight and upcasts it per call."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale_weight", scale)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        if self.scale_weight is not None:
            weight = weight * self.scale_weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class UpcastGatedFF(nn.Module):
    """T5 v1.1's gated-GELU feed-forward for fp8 weights.

    transformers' own version casts its input to `wo.weight.dtype` before `wo`, which with
    fp8 weights would round the activations to fp8; this one keeps them in the compute dtype.
    """

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.wi_0, self.wi_1, self.wo, self.act = ff.wi_0, ff.wi_1, ff.wo, ff.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


def infer_t5_config(state: Dict[str, torch.Tensor]) -> T5Config:
    """Read a T5 v1.1 encoder's sizes from its weights."""
    vocab, d_model = state["shared.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block."))
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = "wi_0" if gated else "wi"
    d_ff = state[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"].shape[0]
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def _strip_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in KNOWN_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


def t5_from_state_dict(
    state: Dict[str, torch.Tensor],
    path: str,
    dtype: torch.dtype,
    config: Optional[T5Config] = None,
    operations=None,
) -> T5EncoderModel:
    """Build a T5 encoder from a state dict in the Hugging Face layout; fp8 linears stay fp8.

    `operations`: layer classes for the linear layers that are not fp8 (e.g. ComfyUI's `comfy.ops`, which
    ComfyUI can load in part); default torch.nn. fp8 linears are always `UpcastLinear`."""
    state = _strip_prefix(dict(state))
    scales = {k[: -len(".scale_weight")]: state.pop(k) for k in list(state) if k.endswith(".scale_weight")}
    state.pop("scaled_fp8", None)
    if "shared.weight" not in state:
        raise CheckpointError(path, "not a T5 encoder: no 'shared.weight' key (expected the Hugging Face T5 layout)")
    try:
        config = config or infer_t5_config(state)
        state.pop("encoder.embed_tokens.weight", None)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(path, f"not a T5 v1.1 encoder: cannot read its sizes ({e})") from None
    from .loader import check_t5_config  # the loader owns the bounds (it imports this module)

    check_t5_config(config, path)  # sizes from a config, or read off the tensors
    try:
        with torch.device("meta"):
            model = T5EncoderModel(config)
    except Exception as e:  # transformers' own checks
        raise CheckpointError(path, f"the T5 config is not usable: {e}") from None
    use_operations(model, operations)
    fp8 = {k for k, v in state.items() if v.dtype in FP8_DTYPES and k.endswith(".weight") and k != "shared.weight"}
    # Everything but the fp8 linear weights is loaded in the compute dtype.
    plain = {k: (v if k in fp8 else v.to(dtype)) for k, v in state.items()}
    plain["encoder.embed_tokens.weight"] = plain["shared.weight"]  # tied: one table in memory
    load_into(model, plain, path, "T5 encoder")
    model.encoder.embed_tokens = model.shared
    for name in sorted(fp8):
        module_name = name[: -len(".weight")]
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, UpcastLinear(old.weight.data, old.bias, scales.get(module_name)))
    if fp8 and config.is_gated_act:
        for block in model.encoder.block:
            block.layer[-1].DenseReluDense = UpcastGatedFF(block.layer[-1].DenseReluDense)
    return model.eval().requires_grad_(False)


def load_text_encoder(path: str, dtype: torch.dtype = torch.float32, operations=None) -> T5EncoderModel:
    """Load a T5 encoder from a Hugging Face folder or a single .safetensors file (`operations`: see
    `t5_from_state_dict`)."""
    if os.path.isdir(path):
        from .loader import read_json, t5_config  # the loader owns the config checks (it imports this module)

        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(path, "no config.json in this text encoder folder")
        raw = read_json(config_path, "T5's settings")
        config = t5_config({k: v for k, v in raw.items() if not k.startswith("_")}, config_path)
        return t5_from_state_dict(read_weights_folder(path, "model"), path, dtype, config, operations)
    state, _ = read_safetensors(path)
    return t5_from_state_dict(state, path, dtype, operations=operations)


def load_mask_embedding(path: str) -> torch.Tensor:
    """Load the official mask-token embedding (.pth, weights-only, CPU) or a .safetensors with one tensor."""
    if path.endswith(".safetensors"):
        tensors, _ = read_safetensors(path)
        if len(tensors) != 1:
            raise CheckpointError(path, f"expected one tensor, found {len(tensors)}")
        emb = next(iter(tensors.values()))
    else:
        emb = load_torch_tensor(path)
    emb = emb.reshape(-1) if emb.ndim == 2 and emb.shape[0] == 1 else emb
    if emb.ndim != 1:
        raise CheckpointError(path, f"a mask embedding is one vector; found shape {tuple(emb.shape)}")
    return emb


def set_mask_embedding(text_encoder: T5EncoderModel, embedding: torch.Tensor, mask_id: int, source: str) -> None:
    """Write the mask-token embedding into row `mask_id` of T5's input embeddings."""
    table = text_encoder.shared.weight
    if embedding.shape[0] != table.shape[1]:
        raise CheckpointError(
            source, f"mask embedding has size {embedding.shape[0]} but the T5 encoder's width is {table.shape[1]}"
        )
    if not 0 <= mask_id < table.shape[0]:
        raise CheckpointError(source, f"mask id {mask_id} is outside T5's vocabulary of {table.shape[0]}")
    with torch.no_grad():
        table[mask_id] = embedding.to(table.dtype)
