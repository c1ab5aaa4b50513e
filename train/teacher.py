"""The frozen vision-language teacher of the alignment loss, loaded from a local Hugging Face folder.

    teacher = Teacher.load("/models/siglip-so400m", device="cuda", dtype=torch.bfloat16)
    teacher.dim                       # embedding size: the transformer is built with align_dim = teacher.dim
    teacher.image_features(pixels)    # [B, dim] from images [B, 3, H, W] in [0, 1]
    teacher.text_features(captions)   # [B, dim]

Kinds (from the folder's config `model_type`):
  * CLIP / SigLIP / SigLIP2: `get_image_features` and `get_text_features` (the joint embedding space);
  * Qwen2.5-VL, as published: the vision tower's merged image tokens mean-pooled, and the caption's input
    embeddings mean-pooled (over real tokens; upstream also averaged in the padding of shorter captions).
The teacher and the projectors exist only in training; exports never contain them.
`CachedTeacher` keeps the features on disk, keyed by the image pixels / caption text and the teacher's identity.
"""

import hashlib
import logging
import os
from typing import List, Optional

import torch

from .feature_cache import FeatureCache, cached

log = logging.getLogger(__name__)

CONTRASTIVE_KINDS = ("clip", "siglip", "siglip2")
QWEN_KINDS = ("qwen2_5_vl",)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output with `pooler_output`; older versions a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def _identity(path: str) -> str:
    """A short fingerprint of the teacher folder: its config and the names and sizes of its weight files."""
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".json")):
            h.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    return h.hexdigest()[:16]


class Teacher:
    def __init__(self, model, processor, tokenizer, kind: str, dim: int, identity: str, max_text_length: int = 64):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.kind, self.dim, self.identity = kind, dim, identity
        self.max_text_length = max_text_length

    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, image_size: Optional[int] = None) -> "Teacher":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"teacher.path {path!r}: not a local Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(path)
        kind = config.model_type
        if kind not in CONTRASTIVE_KINDS + QWEN_KINDS:
            raise ValueError(
                f"teacher.path {path!r}: model_type {kind!r} is not supported; use a CLIP, SigLIP or Qwen2.5-VL folder"
            )
        model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(path)
        if image_size is not None:
            if kind in QWEN_KINDS:
                pixels = image_size * image_size
                processor.min_pixels = processor.max_pixels = pixels
                processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
            else:
                processor.size = {"height": image_size, "width": image_size}
                if hasattr(processor, "crop_size"):
                    processor.crop_size = {"height": image_size, "width": image_size}
                    processor.size = {"shortest_edge": image_size}
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind == "clip":
            dim, max_len = config.projection_dim, config.text_config.max_position_embeddings
        elif kind in ("siglip", "siglip2"):
            dim, max_len = config.text_config.hidden_size, config.text_config.max_position_embeddings
        else:
            dim = getattr(config, "text_config", config).hidden_size
            max_len = 512
        log.info("teacher: %s from %s, embedding size %d", kind, path, dim)
        return cls(model, processor, tokenizer, kind, dim, f"{kind}-{_identity(path)}", max_len)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> [B, dim] float32."""
        images = [p.float().cpu() for p in pixels]
        inputs = self.processor(images=images, do_rescale=False, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        if self.kind in QWEN_KINDS:
            out = _features(
                self.model.get_image_features(pixel_values, image_grid_thw=inputs["image_grid_thw"].to(self.device))
            )
            return torch.stack([tokens.float().mean(0) for tokens in out])
        return _features(self.model.get_image_features(pixel_values=pixel_values)).float()

    @torch.no_grad()
    def text_features(self, texts: List[str]) -> torch.Tensor:
        """Captions -> [B, dim] float32."""
        padding = "max_length" if self.kind in ("siglip", "siglip2") else True  # SigLIP was trained padded
        inputs = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        ).to(self.device)
        if self.kind in QWEN_KINDS:
            embeds = self.model.get_input_embeddings()(inputs["input_ids"]).float()
            mask = inputs["attention_mask"][..., None].float()
            return (embeds * mask).sum(1) / mask.sum(1).clamp_min(1)
        kwargs = {"input_ids": inputs["input_ids"]}
        if self.kind == "clip":
            kwargs["attention_mask"] = inputs["attention_mask"]
        return _features(self.model.get_text_features(**kwargs)).float()


class CachedTeacher:
    """A Teacher whose features are read from / written to a FeatureCache (one file per image or caption)."""

    def __init__(self, teacher: Teacher, cache: Optional[FeatureCache]):
        self.teacher, self.cache = teacher, cache
        self.dim = teacher.dim
        self.hits = self.misses = 0

    def _cached(self, keys, compute):
        found, computed = cached(len(keys), self.cache, keys, lambda todo: compute(todo).cpu())
        self.hits += len(keys) - computed
        self.misses += computed
        return torch.stack(found)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        quantised = (pixels.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        keys = [
            FeatureCache.key("teacher-image", self.teacher.identity, tuple(q.shape), q.numpy().tobytes())
            for q in quantised
        ]
        return self._cached(keys, lambda idx: self.teacher.image_features(pixels[idx]))

    def text_features(self, texts: List[str]) -> torch.Tensor:
        keys = [FeatureCache.key("teacher-text", self.teacher.identity, t) for t in texts]
        return self._cached(keys, lambda idx: self.teacher.text_features([texts[i] for i in idx]))
