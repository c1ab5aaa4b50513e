"""The optimizer (AdamW) and its learning-rate schedule."""

import torch

from .config import Config


def make_optimizer_and_schedule(params, cfg: Config):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay
    )
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.train.schedule]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
    )
    return optimizer, scheduler
