"""A small vision-language teacher for the alignment loss (stage 3 of ``python -m train.shapes``).

transformers' ``CLIPModel`` at toy size, trained contrastively (symmetric InfoNCE, CLIP's learned temperature)
on the world's (image, caption) pairs, then saved as an ordinary Hugging Face folder (config, weights, image
processor, tokenizer) that ``train.teacher.Teacher.load`` reads like any CLIP checkpoint. Its text tower reads
the world's word-level tokenizer and pools at the first ``</s>``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel


def make_clip(tokenizer, image_size: int = 32, width: int = 96, layers: int = 2, dim: int = 64) -> CLIPModel:
    """A fresh toy CLIP whose text tower reads ``tokenizer``'s ids."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=4,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim))


def image_processor(image_size: int = 32) -> CLIPImageProcessor:
    """CLIP's processor at the world's size (CLIP's normalisation, no resize beyond it)."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def train_clip(
    images: torch.Tensor,
    captions: list[str],
    tokenizer,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> tuple[CLIPModel, dict]:
    """Train a toy CLIP on uint8 images [N, 3, H, W] and their captions; returns (model in eval mode, stats).

    ``progress(step, parts)`` is called after every step. Batches never hold the same caption twice, so no pair
    is pushed apart from its own duplicate.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = image_processor(images.shape[-1])
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    model = make_clip(tokenizer, image_size=images.shape[-1]).train()
    ids = tokenizer(captions, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s / max(steps, 1), 1))))
    )
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_caption.setdefault(c, []).append(i)
    groups = list(by_caption.values())
    parts = {}
    for step in range(steps):
        chosen = rng.choice(len(groups), size=min(batch_size, len(groups)), replace=False)
        idx = torch.tensor([groups[g][rng.integers(len(groups[g]))] for g in chosen])
        pixels = (images[idx].float() / 255 - mean) / std
        out = model(input_ids=ids["input_ids"][idx], attention_mask=ids["attention_mask"][idx], pixel_values=pixels)
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        parts = {"loss": loss.item(), "acc": (out.logits_per_image.argmax(1) == target).float().mean().item()}
        if progress is not None:
            progress(step + 1, parts)
    return model.eval().requires_grad_(False), dict(parts, steps=steps, pairs=len(captions))


def save_teacher(model: CLIPModel, tokenizer, folder: str) -> str:
    """Write the Hugging Face folder that ``train.teacher.Teacher.load`` reads."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    image_processor(model.config.vision_config.image_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
