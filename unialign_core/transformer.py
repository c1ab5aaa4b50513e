"""The UniAlignment transformer: one SD3 MMDiT with an image head and a text head.

Built from diffusers' SD3 building blocks, key-compatible with the released
UniAlignment and DualDiffusion `transformer/` folders. The changes from stock SD3
(see the reference README) are:

1. the last block keeps its text stream (`context_pre_only=False`);
2. the time embedding takes the timestep only (no pooled text), and UniAlignment
   rounds the 256-d sinusoidal projection to float16 (`fp16_time_projection`);
3. two output heads: `image_norm_out`/`image_proj_out` and `text_norm_out`/`text_proj_out`;
4. `null_image_embd`: the image tokens used when there is no image;
5. optional training-only alignment projectors (`align_dim`), never built for inference.

Condition images (an edit source, or 1-3 references) go through the same patch
embedding, are appended after the target tokens, and are dropped after the last
block: tokens are sliced by count, so any size and aspect ratio works.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous

# Names of the training-only parameters; exports and inference never hold them.
ALIGN_PREFIXES = ("siglip_adapter_img.", "siglip_adapter_text.")
# Where low-precision (fp8) weight storage applies: the joint blocks' linear layers (about 94% of the weights);
# the embedders, the heads and every norm keep the compute dtype.
FP8_SCOPE = "transformer_blocks."


class CastOps:
    """Layer operations whose Linear casts its weight and bias to the input's dtype and device per call.

    The default for fp8 weight storage outside ComfyUI (which passes its own `comfy.ops.manual_cast`)."""

    class Linear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
            return torch.nn.functional.linear(x, self.weight.to(x.device, x.dtype), bias)


def use_operations(module: nn.Module, operations=None) -> nn.Module:
    """Replace every plain `nn.Linear` under `module` by `operations.Linear` of the same shape, dtype and device.

    `operations` is a namespace with a `Linear` class taking torch's arguments, as ComfyUI's `comfy.ops`
    classes are (None or `torch.nn`: nothing changes). Attribute names stay, so state-dict keys are identical.
    Call it on a model built on the meta device, before its weights are loaded."""
    if operations is None or operations is nn or getattr(operations, "Linear", nn.Linear) is nn.Linear:
        return module
    for child in list(module.modules()):
        for attr, layer in list(child.named_children()):
            if type(layer) is nn.Linear:
                new = operations.Linear(
                    layer.in_features,
                    layer.out_features,
                    bias=layer.bias is not None,
                    device=layer.weight.device,
                    dtype=layer.weight.dtype,
                )
                setattr(child, attr, new)
    return module


def low_precision_keys(module: nn.Module, scope: str = FP8_SCOPE) -> List[str]:
    """The weight keys of the linear layers under `scope`: the ones a low-precision `weight_dtype` stores."""
    return [f"{n}.weight" for n, m in module.named_modules() if n.startswith(scope) and isinstance(m, nn.Linear)]


class TimestepOnlyEmbedding(nn.Module):
    """Sinusoidal timestep projection followed by an MLP (no pooled-text path)."""

    def __init__(self, dim: int, fp16_projection: bool):
        super().__init__()
        self.fp16_projection = fp16_projection
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        proj = self.time_proj(timestep)
        if self.fp16_projection:
            # UniAlignment's released model feeds a float16 projection to the MLP.
            proj = proj.to(torch.float16)
        return self.timestep_embedder(proj.to(self.timestep_embedder.linear_1.weight.dtype))


class AlignmentProjector(nn.Module):
    """Mean-pool over tokens, then Linear-SiLU-Linear-SiLU (`siglip_adapter_*` upstream)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out), nn.SiLU())

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.fc(states.mean(dim=1))


@dataclass
class TransformerOutput:
    """What one forward pass returns. Fields not asked for are None."""

    velocity: Optional[torch.Tensor]  # [B, C, h, w]
    text_logits: Optional[torch.Tensor]  # [B, L, vocab]
    image_states: Optional[torch.Tensor]  # [B, N_target, D] after image_norm_out
    text_states: Optional[torch.Tensor]  # [B, L, D] after text_norm_out
    block_image_states: Optional[torch.Tensor] = None  # [B, N_target, D] after block `return_block`
    block_text_states: Optional[torch.Tensor] = None  # [B, L, D] after block `return_block`


@dataclass
class ImageStreamCache:
    """The image stream's attention keys and values of every block, from one full pass.

    For captions and answers the image tokens are clean and the timestep is fixed, so a following step can run
    the text tokens alone, attending to these keys and values (`UniAlignTransformer.forward_text`). The image
    stream itself also reads the text, so reusing them after the text changed is an approximation.
    """

    keys: List[torch.Tensor]  # per block, [B, heads, N_image, head_dim] (after the key norm, if any)
    values: List[torch.Tensor]  # per block, [B, heads, N_image, head_dim]

    def select(self, rows: torch.Tensor) -> "ImageStreamCache":
        """The cache of some batch rows."""
        return ImageStreamCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


class UniAlignTransformer(ModelMixin, ConfigMixin):
    """The unified image/text diffusion transformer.

    Args:
        vocab_size: size of the text head (32100 for the T5 tokenizer).
        sample_size: default latent size (kept for config compatibility).
        patch_size: latent patch size (2).
        in_channels / out_channels: latent channels (16).
        num_layers: number of joint blocks (24 for SD3-medium).
        attention_head_dim / num_attention_heads: head size and count (64 x 24).
        joint_attention_dim: width of the text encoder states (4096 for T5-XXL).
        caption_projection_dim: kept for config compatibility (equals the inner dim).
        pooled_projection_dim: kept for config compatibility (unused: no pooled text path).
        pos_embed_max_size: side of the learned position table (192).
        fp16_time_projection: round the timestep projection to float16 (True for UniAlignment,
            False for DualDiffusion).
        align_dim: output size of the training-only alignment projectors (3584 for Qwen2.5-VL-7B);
            None builds no projectors (inference).
        align_hidden_dim: hidden size of those projectors (2048).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32100,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
        fp16_time_projection: bool = True,
        align_dim: Optional[int] = None,
        align_hidden_dim: int = 2048,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.out_channels = out_channels
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = TimestepOnlyEmbedding(dim, fp16_time_projection)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        # Every block, the last one included, keeps its text stream.
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, attention_head_dim, context_pre_only=False)
            for _ in range(num_layers)
        )
        self.image_norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.image_proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.text_norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(dim, vocab_size)
        self.null_image_embd = nn.Parameter(torch.randn(1, 8, dim) / dim**0.5)
        if align_dim is not None:
            self._build_projectors(align_dim, align_hidden_dim)
        self.gradient_checkpointing = False

    def _build_projectors(self, align_dim: int, hidden: int) -> None:
        self.siglip_adapter_img = AlignmentProjector(self.inner_dim, hidden, align_dim)
        self.siglip_adapter_text = AlignmentProjector(self.inner_dim, hidden, align_dim)

    def add_projectors(self, align_dim: int, hidden: int = 2048) -> List[str]:
        """Give this (loaded) transformer fresh alignment projectors of output size `align_dim`, on its device, and
        record them in its config; returns their keys."""
        self._build_projectors(align_dim, hidden)
        device = self.pos_embed.proj.weight.device
        self.siglip_adapter_img.to(device)
        self.siglip_adapter_text.to(device)
        self.register_to_config(align_dim=align_dim, align_hidden_dim=hidden)
        return [k for k in self.state_dict() if k.startswith(ALIGN_PREFIXES)]

    def embed_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Patchify latents [B, C, h, w] into tokens [B, h*w/p^2, D] with positions added."""
        p = self.config.patch_size
        h, w = latents.shape[-2:]
        if h % p or w % p:
            raise ValueError(
                f"latents of size {h}x{w} are not a multiple of the patch size {p}; "
                f"use images whose sides are a multiple of {p * 8} pixels"
            )
        limit = self.config.pos_embed_max_size
        if h // p > limit or w // p > limit:
            raise ValueError(
                f"latents of size {h}x{w} exceed the position table ({limit * p}x{limit * p} latents); "
                "use a smaller image"
            )
        return self.pos_embed(latents)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, h*w/p^2, p*p*C] back to latents [B, C, h, w]."""
        p, c = self.config.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], h // p, w // p, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(tokens.shape[0], c, h, w)

    def forward(
        self,
        latents: Optional[torch.Tensor],
        context: torch.Tensor,
        timestep: torch.Tensor,
        conditions: Optional[List[torch.Tensor]] = None,
        return_block: Optional[int] = None,
        compute_image: bool = True,
        compute_text: bool = True,
    ) -> TransformerOutput:
        """Run the joint transformer.

        Args:
            latents: noisy target latents [B, C, h, w], or None for text-only input
                (the learned null image tokens are used).
            context: text encoder states [B, L, joint_attention_dim].
            timestep: [B] or scalar, on the 0..1000 scale (sigma * 1000).
            conditions: clean condition latents appended as extra image tokens
                (edit source or references), each [B, C, h', w'].
            return_block: if k is given, also return the states after block k (1-based),
                for the alignment loss.
            compute_image / compute_text: skip a head whose output is not needed.
        """
        batch = context.shape[0]
        if latents is not None:
            h, w = latents.shape[-2:]
            hidden = self.embed_image(latents)
        else:
            hidden = self.null_image_embd.expand(batch, -1, -1).to(context.dtype)
        num_target = hidden.shape[1]
        if conditions:
            hidden = torch.cat([hidden] + [self.embed_image(c) for c in conditions], dim=1)

        timestep = torch.as_tensor(timestep, device=context.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb = self.time_text_embed(timestep)
        text = self.context_embedder(context)

        block_image = block_text = None
        for index, block in enumerate(self.transformer_blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                text, hidden = self._gradient_checkpointing_func(block, hidden, text, temb)
            else:
                text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
            if return_block is not None and index + 1 == return_block:
                block_image, block_text = hidden[:, :num_target], text

        image_states = velocity = None
        if latents is not None and compute_image:
            image_states = self.image_norm_out(hidden[:, :num_target], temb)
            velocity = self.unpatchify(self.image_proj_out(image_states), h, w)
        text_states = self.text_norm_out(text)
        text_logits = self.text_proj_out(text_states) if compute_text else None
        return TransformerOutput(velocity, text_logits, image_states, text_states, block_image, block_text)

    def project_for_alignment(self, block_image_states: torch.Tensor, block_text_states: torch.Tensor):
        """Mean-pool and project block states for the alignment loss (training only)."""
        if self.config.align_dim is None:
            raise RuntimeError("this transformer has no alignment projectors; build it with align_dim set")
        return self.siglip_adapter_img(block_image_states), self.siglip_adapter_text(block_text_states)

    @torch.no_grad()
    def forward_with_image_cache(self, latents, context, timestep, conditions=None, **kwargs):
        """`forward` unchanged (same numbers), also returning every block's image keys and values.

        The keys and values are read from the blocks' own `attn.to_k` / `attn.to_v` outputs as the
        pass runs, so the returned output is exactly `forward`'s.
        """
        keys, values, hooks = [], [], []

        def grab(store, attn, norm):
            def hook(module, inputs, output):
                x = _heads(output, attn.heads)
                store.append(x if norm is None else norm(x))

            return hook

        for block in self.transformer_blocks:
            attn = block.attn
            hooks.append(attn.to_k.register_forward_hook(grab(keys, attn, attn.norm_k)))
            hooks.append(attn.to_v.register_forward_hook(grab(values, attn, None)))
        try:
            out = self.forward(latents, context, timestep, conditions, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        if len(keys) != len(self.transformer_blocks) or len(values) != len(keys):
            raise RuntimeError("the image keys and values were not seen once per block; cannot build the cache")
        return out, ImageStreamCache(keys, values)

    @torch.no_grad()
    def forward_text(self, context: torch.Tensor, timestep: torch.Tensor, cache: ImageStreamCache) -> TransformerOutput:
        """The text stream alone, attending to cached image keys and values (see `ImageStreamCache`).

        Runs each block's text half with the block's own weights: AdaLN-Zero modulation, joint attention
        over [image keys, text keys], output projection, gated residuals and the feed-forward.
        """
        batch = context.shape[0]
        if cache.keys[0].shape[0] != batch:
            raise ValueError(f"the image cache holds {cache.keys[0].shape[0]} rows but the text has {batch}")
        timestep = torch.as_tensor(timestep, device=context.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb = self.time_text_embed(timestep)
        text = self.context_embedder(context)
        for block, k_image, v_image in zip(self.transformer_blocks, cache.keys, cache.values):
            attn = block.attn
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(text, emb=temb)
            q = _heads(attn.add_q_proj(normed), attn.heads)
            k = _heads(attn.add_k_proj(normed), attn.heads)
            v = _heads(attn.add_v_proj(normed), attn.heads)
            if attn.norm_added_q is not None:
                q = attn.norm_added_q(q)
            if attn.norm_added_k is not None:
                k = attn.norm_added_k(k)
            k = torch.cat([k_image.to(k.dtype), k], dim=2)  # the joint order: image first, then text
            v = torch.cat([v_image.to(v.dtype), v], dim=2)
            mixed = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            mixed = mixed.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
            text = text + gate_msa.unsqueeze(1) * attn.to_add_out(mixed)
            normed = block.norm2_context(text) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            text = text + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        text_states = self.text_norm_out(text)
        return TransformerOutput(None, self.text_proj_out(text_states), None, text_states)
