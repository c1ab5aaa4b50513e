"""The untrained starting point of the shapes model (stage 5a of ``python -m train.shapes``).

A folder in the upstream layout (``transformer/ text_encoder/ vae/ tokenizer/ scheduler/``) that the trainer's
``init.path`` reads like a released checkpoint: a small random UniAlignment transformer, and the world's T5
encoder (frozen in training, as T5-XXL is), VAE and tokenizer.
"""

from __future__ import annotations

import json
import os

import torch

from unialign_core import UniAlignTransformer
from unialign_core.files import write_text_atomic

# 4 blocks of width 128: about 2.4 M transformer parameters; a 32 px image is 64 tokens (VAE x2, patch 2).
TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
                   num_attention_heads=4, caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=16,
                   fp16_time_projection=False)  # fmt: skip
# Few image tokens: SD3's shift of 3 would spend most steps on pure noise; 1.0 is the plain flow schedule.
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


def write_start(
    folder: str, tokenizer, vae, text_encoder, seed: int = 0, transformer_overrides: dict | None = None
) -> str:
    """Write the starting folder; returns its path."""
    torch.manual_seed(seed)
    config = dict(
        TRANSFORMER,
        vocab_size=len(tokenizer),
        joint_attention_dim=text_encoder.config.d_model,
        **(transformer_overrides or {}),
    )
    UniAlignTransformer(**config).save_pretrained(os.path.join(folder, "transformer"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    write_text_atomic(os.path.join(folder, "scheduler", "scheduler_config.json"), json.dumps(SCHEDULER, indent=1))
    return folder
