"""LoRA set-up: adapters on the transformer (peft), the rest frozen."""

import torch

from .config import Config, ConfigError


def apply_lora(transformer, cfg: Config):
    from peft import LoraConfig, inject_adapter_in_model

    lora = cfg.train.lora
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        init_lora_weights=True,
    )
    transformer.requires_grad_(False)
    try:
        inject_adapter_in_model(config, transformer)
    except ValueError as e:
        raise ConfigError(f"train.lora.targets: {e}") from None
    if cfg.train.train_projectors and transformer.config.align_dim is not None:
        for name in ("siglip_adapter_img", "siglip_adapter_text"):
            getattr(transformer, name).requires_grad_(True)
    return transformer


def cast_frozen_base(transformer, dtype: torch.dtype):
    """Keep the frozen base weights in `dtype`: under mixed precision they need no fp32 master copy. At full size
    this halves the transformer's memory (4.3 GB in bf16 instead of 8.6 GB); the LoRA and projector weights (the
    ones that train) stay fp32."""
    frozen_base = [p for p in transformer.parameters() if not p.requires_grad]
    for p in frozen_base:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return transformer
