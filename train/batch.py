"""Batch preparation: the frozen encoders (VAE, T5, teacher) with their optional disk caches, and one collated
micro-batch turned into the tensors the losses take (`losses.Prepared`)."""

import dataclasses

import torch

from unialign_core import UniAlignModel
from unialign_core.vae import posterior

from .config import Config
from .data import Batch
from .feature_cache import FeatureCache, cached
from .frozen import cast_frozen, fingerprint
from .losses import Prepared, SampleRNG


class Encoders:
    """The frozen encoders (VAE, T5, teacher) with their optional disk caches."""

    def __init__(self, bundle: UniAlignModel, device, frozen_dtype, compute_dtype, cfg: Config, teacher=None):
        self.bundle, self.device, self.compute_dtype = bundle, device, compute_dtype
        self.vae, self.t5, self.tokenizer = bundle.vae, bundle.text_encoder, bundle.tokenizer
        for module in (self.vae, self.t5):
            cast_frozen(module.to(device).eval().requires_grad_(False), frozen_dtype)
        self.text_length = cfg.data.text_length
        self.padding = cfg.data.prompt_padding  # "training" (end-of-text, official) or "inference" (<pad>)
        self.cache = FeatureCache(cfg.data.cache_dir) if cfg.data.cache_dir else None
        self.vae_id = fingerprint(self.vae) if self.cache else ""
        self.t5_id = fingerprint(self.t5) if self.cache else ""
        self.teacher = teacher
        self.null_context = self.encode_prompts([" "])

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=ids.to(self.device))[0].to(self.compute_dtype)

    @torch.no_grad()
    def encode_prompts(self, texts):
        """T5 states of prompts, padded by `data.prompt_padding` (`PROMPT_PADDING`; the official training's rule,
        end-of-text, by default)."""
        pad = self.padding
        keys = [FeatureCache.key("t5", self.t5_id, t, self.text_length, pad) for t in texts] if self.cache else None
        out, _ = cached(
            len(texts),
            self.cache,
            keys,
            lambda todo: self.encode_ids(self.bundle.tokenize([texts[i] for i in todo], self.text_length, pad)),
        )
        return torch.stack([o.to(self.device, self.compute_dtype) for o in out])

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor):
        """VAE posterior (mean, std) per image, cached by the image's pixels."""
        keys = None
        if self.cache:
            q = (pixels.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            keys = [FeatureCache.key("vae", self.vae_id, tuple(x.shape), x.numpy().tobytes()) for x in q]

        def compute(todo):
            dist = posterior(self.vae, pixels[todo])
            return torch.cat([dist.mean, dist.std], dim=1).float()

        out, _ = cached(pixels.shape[0], self.cache, keys, compute)
        both = torch.stack([o.to(self.device) for o in out])
        return both.chunk(2, dim=1)

    def latents(self, pixels: torch.Tensor, rng: SampleRNG, *purposes: str):
        """Scaled latents, sampling the posterior with per-sample noise (as published: `.sample()`): one
        independent sample per purpose (one tensor for one purpose, else a list), the VAE run once."""
        mean, std = self.moments(pixels)
        out = []
        for purpose in purposes:
            z = mean + std * rng.randn(purpose, mean.shape[1:]).to(self.device)
            out.append(self.bundle.scale_latents(z).to(self.compute_dtype))
        return out[0] if len(out) == 1 else out


def pad_batch(batch: Batch, size: int) -> Batch:
    """The batch with its last sample repeated until it has `size` samples; `present` marks the real ones."""
    n = len(batch.index)
    present = [True] * n + [False] * (size - n)
    if n == size:
        return dataclasses.replace(batch, present=present)

    def grow(t):
        return torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])]) if t is not None else None

    def repeat(items):
        return items + [items[-1]] * (size - n)

    return dataclasses.replace(
        batch,
        target=grow(batch.target),
        sources=[grow(s) for s in batch.sources],
        text=repeat(batch.text),
        caption=repeat(batch.caption),
        index=repeat(batch.index),
        present=present,
    )


def prepare_batch(batch: Batch, enc: Encoders, rng: SampleRNG, need_teacher: bool) -> Prepared:
    """Run the frozen encoders on one padded micro-batch (`pad_batch`)."""
    task, device = batch.task, enc.device
    present = torch.tensor(batch.present, device=device)
    sources = [enc.latents(s, rng, f"vae_source{k}") for k, s in enumerate(batch.sources)]
    target = understand = None
    if batch.target is not None and not sources:
        # text-to-image: the official training encodes the image twice, once for the image pass and once for the
        # text pass, so the two passes see independent posterior samples
        target, understand = enc.latents(batch.target, rng, "vae_target", "vae_understand")
    elif batch.target is not None:  # edit, perception, compose: both passes read the one target sample
        target = understand = enc.latents(batch.target, rng, "vae_target")
    else:  # caption, vqa: the text pass reads the source
        understand = sources[0]
    conditions = sources if target is not None else []
    rows = [enc.bundle.caption_ids(task, t, c, enc.text_length) for t, c in zip(batch.text, batch.caption)]
    ids, maskable, not_pad = (torch.tensor([r[i] for r in rows], device=device) for i in range(3))
    caption_valid = torch.tensor([bool(c.strip()) for c in batch.caption], device=device) & present
    prepared = Prepared(
        target=target,
        conditions=conditions,
        prompt_context=enc.encode_prompts(batch.text) if target is not None else None,
        null_context=enc.null_context,
        understand=understand,
        ids=ids,
        maskable=maskable,
        not_pad=not_pad,
        caption_valid=caption_valid,
        sample_valid=present,
    )
    if need_teacher and enc.teacher is not None:
        pixels = batch.target if batch.target is not None else batch.sources[0]
        texts = [f"{t} {c}" if task == "vqa" else c for t, c in zip(batch.text, batch.caption)]
        texts = [t if t.strip() else " " for t in texts]
        prepared.teacher_image = enc.teacher.image_features(pixels).to(device)
        prepared.teacher_text = enc.teacher.text_features(texts).to(device)
    return prepared
