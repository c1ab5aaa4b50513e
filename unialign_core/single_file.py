"""Our single-file model format: one .safetensors with the transformer and a JSON metadata header.

Tensors: the transformer's weights under their released key names (training-only projectors
are never written). A file may also bundle a small text encoder and VAE under the
`text_encoder.` and `vae.` prefixes (the tiny shapes-world models do; full-size files don't).

Metadata (all strings, JSON where structured):
    format            "unialignment"
    format_version    "1"
    model_config      the transformer config
    vocab_size        text head size
    mask_id           id of the mask token
    scheduler_config  the flow-matching scheduler config
    mask_embedding    optional: JSON {"dtype": ..., "values": [...]} for T5's mask row
    tokenizer         optional: tokenizer.json text
    tokenizer_special optional: JSON {eos_token, pad_token, unk_token}
    text_encoder_config / vae_config   configs of bundled components
    text_length       optional: T5 tokens per prompt the model was trained with (the trainer's export writes
                      it; absent means 256, the published length); the modes default to it
"""

import json
from typing import Dict, Optional

import torch

from .checkpoint import save_safetensors_atomic
from .transformer import ALIGN_PREFIXES

FORMAT = "unialignment"
FORMAT_VERSION = "1"
BUNDLE_PREFIXES = ("text_encoder.", "vae.")


def encode_tensor(t: torch.Tensor) -> str:
    """A small tensor as exact JSON (float32 holds bf16/fp16 values exactly)."""
    return json.dumps({"dtype": str(t.dtype).replace("torch.", ""), "values": t.float().flatten().tolist()})


def decode_tensor(text: str) -> torch.Tensor:
    data = json.loads(text)
    return torch.tensor(data["values"], dtype=torch.float32).to(getattr(torch, data["dtype"]))


def _config_dict(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def save_single_file(
    path: str,
    transformer,
    *,
    scheduler_config: dict,
    mask_id: int,
    mask_embedding: Optional[torch.Tensor] = None,
    tokenizer=None,
    text_encoder=None,
    vae=None,
    dtype: Optional[torch.dtype] = None,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Write the single-file model atomically (a temp file, then a rename): never half-written.

    Args:
        path: destination `.safetensors`.
        transformer: a `UniAlignTransformer` (alignment projectors are left out).
        scheduler_config: the flow-matching scheduler config to ship with it.
        mask_id: the mask token id.
        mask_embedding: optional T5 mask-row vector to store in the header.
        tokenizer: optional tokenizer to embed (recommended for models with their own vocabulary).
        text_encoder / vae: optional components to bundle (small models only).
        dtype: optional dtype to store the weights in (e.g. torch.bfloat16).
    """
    if not path.endswith(".safetensors"):
        raise ValueError(f"output path {path!r} must end with .safetensors")
    config = _config_dict(transformer)
    config["align_dim"] = None
    tensors = {k: v for k, v in transformer.state_dict().items() if not k.startswith(ALIGN_PREFIXES)}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(config),
        "vocab_size": str(config["vocab_size"]),
        "mask_id": str(int(mask_id)),
        "scheduler_config": json.dumps({k: v for k, v in scheduler_config.items() if not k.startswith("_")}),
    }
    if mask_embedding is not None:
        metadata["mask_embedding"] = encode_tensor(mask_embedding)
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.backend_tokenizer.to_str()
        special = {n: getattr(tokenizer, n) for n in ("eos_token", "pad_token", "unk_token")}
        metadata["tokenizer_special"] = json.dumps({k: v for k, v in special.items() if v is not None})
    if text_encoder is not None:
        metadata["text_encoder_config"] = json.dumps(text_encoder.config.to_dict())
        for k, v in text_encoder.state_dict().items():
            if k != "encoder.embed_tokens.weight":  # tied to shared.weight
                tensors["text_encoder." + k] = v
    if vae is not None:
        metadata["vae_config"] = json.dumps(_config_dict(vae))
        tensors.update({"vae." + k: v for k, v in vae.state_dict().items()})
    metadata.update(extra_metadata or {})
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in tensors.items()
    }
    return save_safetensors_atomic(tensors, path, metadata)
