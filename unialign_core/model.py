"""The loaded model, and every rule that training and inference must agree on.

    model = load_model(path)                     # a UniAlignModel (see loader.py)
    model.scale_latents(raw) / model.unscale_latents(latents)
    model.tokenize(texts) / model.encode_prompts(texts)       # `model.text_length` T5 tokens per prompt
    model.tokenize(texts, padding="training")    # padded as the official training pads (see PROMPT_PADDING)
    model.question_ids(question)                 # the frozen `Q: ... A: ` prompt of a VQA answer
    model.caption_ids(task, text, caption)       # (ids, maskable, not_pad): one training row of a caption/VQA sample
    model.fit_latent_rgb()                       # a latent -> RGB preview matrix

The trainer (`train/`) and the modes (`modes.py`) both go through these, so that they cannot drift apart.
`DTYPES` is the one map from dtype names ("fp32", "bf16", "fp16") to torch dtypes.
"""

import contextlib
import logging
from typing import List, Optional

import torch
import torch.nn.functional as F

from .errors import CheckpointError
from .vae import decode, encode, encode_mean, scale_latents, unscale_latents

log = logging.getLogger("unialign_core")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TEXT_LENGTH = 256  # T5 tokens per prompt in the published training
VQA_TEMPLATE = "Q: {question} A: "  # the published VQA prompt; the answer follows it

# How token ids are padded to `text_length`. The official code pads in two ways, and each side keeps its own:
#   "inference": the official pipeline pads prompts with the tokenizer's <pad> (id 0); the modes and nodes do.
#   "training": the official training sets the tokenizer's pad token to end-of-text, so it pads prompts, the " " of
#       text dropout and the captions with </s> (id 1); the trainer does.
PROMPT_PADDING = ("inference", "training")


def pad_id(tokenizer, padding: str) -> int:
    """The id that pads token ids under `padding` (one of PROMPT_PADDING)."""
    if padding == "inference":
        return tokenizer.pad_token_id
    if padding == "training":
        return tokenizer.eos_token_id
    raise ValueError(f"padding: must be one of {', '.join(PROMPT_PADDING)}, got {padding!r}")


CUT_PREVIEW_WORDS = 8  # how many words of a prompt's cut end a warning quotes (never all of it: it can be huge)


def describe_cut(tokenizer, ids: List[int], text_length: int) -> Optional[str]:
    """What a prompt loses at `text_length` tokens, in words: how many of its token ids `ids` (which end with the
    tokenizer's end-of-text) are cut, and the first few words of them; None when it fits."""
    if len(ids) <= text_length:
        return None
    cut = ids[text_length - 1 : -1]  # the kept ids end with a new end-of-text
    shown = cut[: 4 * CUT_PREVIEW_WORDS]
    words = tokenizer.decode(shown, skip_special_tokens=True).split()
    start = " ".join(words[:CUT_PREVIEW_WORDS])
    if len(start) > 80:
        start = start[:80]
    if start and (len(words) > CUT_PREVIEW_WORDS or len(cut) > len(shown) or len(start) == 80):
        start += " ..."
    begins = f", starting with {start!r}" if start else " (they begin with no text T5 can show)"
    return f"longer than this model's {text_length} T5 tokens; its last {len(cut)} tokens were cut and not used{begins}"


def question_ids(tokenizer, question: str) -> List[int]:
    """Token ids of the VQA prompt `Q: {question} A: `, without the tokenizer's trailing end-of-text: the answer
    follows them (frozen while an answer is sampled, never masked in training)."""
    ids = tokenizer(VQA_TEMPLATE.format(question=question), add_special_tokens=True)["input_ids"]
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


def caption_ids(tokenizer, task: str, text: str, caption: str, text_length: int):
    """(ids, maskable, not_pad) for one training sample, each `text_length` long. VQA ("vqa"): the `Q: ... A: `
    prompt of `text` stays visible, the answer `caption` is learned; other tasks learn the whole `caption`.
    Ids are padded as the official training pads (with EOS, `pad_id(..., "training")`); the first EOS is a real
    token."""
    eos = tokenizer.eos_token_id
    if task == "vqa":
        prompt = question_ids(tokenizer, text)
        answer = tokenizer(caption, add_special_tokens=True)["input_ids"]
        ids, frozen = prompt + answer, len(prompt)
    else:
        ids, frozen = tokenizer(caption, add_special_tokens=True)["input_ids"], 0
    if len(ids) > text_length:
        ids = ids[: text_length - 1] + [eos]
    frozen = min(frozen, text_length - 1)
    n = len(ids)
    ids = ids + [pad_id(tokenizer, "training")] * (text_length - n)
    maskable = [i >= frozen for i in range(text_length)]
    not_pad = [i < n for i in range(text_length)]
    return ids, maskable, not_pad


def fit_latent_rgb(model, images: int = 8, seed: int = 0) -> torch.Tensor:
    """A [C + 1, 3] matrix: `[latent, 1] @ W` approximates the pixels (in -1..1) of a latent cell.

    A few smooth random colour images are encoded (posterior means: sampling noise would blur the fit), their
    pixels averaged down to the latent grid, and a least-squares fit maps latent vectors (plus a bias) to RGB.
    `model` needs only `vae` and `pixel_multiple`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    side = model.pixel_multiple * 4
    colours = torch.rand(images, 3, 4, 4, generator=generator)
    pixels = F.interpolate(colours, size=(side, side), mode="bilinear", align_corners=False)
    latents = encode_mean(model.vae, pixels).float().cpu()
    target = F.adaptive_avg_pool2d(pixels * 2 - 1, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x, y).solution


class UniAlignModel:
    """Everything a mode needs: transformer, VAE, T5, tokenizer, scheduler config and mask id."""

    def __init__(
        self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict, mask_id: int, source: str,
        mask_embedding: Optional[torch.Tensor] = None, text_length: int = DEFAULT_TEXT_LENGTH,
    ):  # fmt: skip
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.mask_id = int(mask_id)
        self.source = source
        self.mask_embedding = mask_embedding  # what was written into T5's mask row, or None
        self.text_length = int(text_length)  # T5 tokens per prompt the model was trained with
        # None, or a function returning a context manager that every T5 call runs inside (ComfyUI's
        # nodes load T5 there, so that it can be unloaded between prompts).
        self.text_encoder_scope = None
        self.check_vocabulary()

    def check_vocabulary(self):
        vocab = self.transformer.config.vocab_size
        t5_rows = self.text_encoder.shared.weight.shape[0]
        if not self.mask_id < vocab <= t5_rows:
            raise CheckpointError(
                self.source,
                f"vocabulary mismatch: mask id {self.mask_id}, text head {vocab}, T5 table {t5_rows} "
                "(the text encoder does not belong to this model?)",
                component="text_encoder",
            )
        if self.transformer.config.joint_attention_dim != self.text_encoder.config.d_model:
            raise CheckpointError(
                self.source,
                f"the text encoder's width {self.text_encoder.config.d_model} does not match the transformer's "
                f"joint_attention_dim {self.transformer.config.joint_attention_dim}",
                component="text_encoder",
            )

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_embed.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.pos_embed.proj.weight.dtype

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor x patch size)."""
        return self.vae_scale * self.transformer.config.patch_size

    def to(self, device=None, dtype=None) -> "UniAlignModel":
        for module in (self.transformer, self.vae, self.text_encoder):
            module.to(device)
        if dtype is not None:
            self.transformer.to(dtype=dtype)
        return self

    def tokenize(self, texts: List[str], text_length: Optional[int] = None, padding: str = "inference") -> torch.Tensor:
        """Token ids padded to `text_length` (default: `self.text_length`) by the `padding` rule ("inference",
        the official pipeline's <pad>, or "training", the official training's end-of-text; see PROMPT_PADDING);
        logs what a too-long text lost."""
        fill = pad_id(self.tokenizer, padding)
        text_length = text_length or self.text_length
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for ids in full:
            cut = describe_cut(self.tokenizer, ids, text_length)
            if cut:
                log.warning("prompt %s", cut)
        batch = self.tokenizer(
            texts, padding="max_length", max_length=text_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, fill)

    def question_ids(self, question: str) -> List[int]:
        """The frozen prompt ids of a VQA answer (`Q: {question} A: `, no trailing end-of-text)."""
        return question_ids(self.tokenizer, question)

    def caption_ids(self, task: str, text: str, caption: str, text_length: Optional[int] = None):
        """(ids, maskable, not_pad) of one caption or VQA training sample (see `caption_ids`), `text_length`
        tokens (default: `self.text_length`)."""
        return caption_ids(self.tokenizer, task, text, caption, text_length or self.text_length)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """T5 states for token ids, with no attention mask (as published)."""
        with self.text_encoder_scope() if self.text_encoder_scope else contextlib.nullcontext():
            ids = ids.to(self.text_encoder.shared.weight.device)
            return self.text_encoder(input_ids=ids)[0].to(self.dtype)

    def encode_prompts(
        self, prompts: List[str], text_length: Optional[int] = None, padding: str = "inference"
    ) -> torch.Tensor:
        """T5 states of prompts padded to `text_length` tokens (default: the length the model was trained with)
        by the `padding` rule (see `tokenize`)."""
        return self.encode_ids(self.tokenize(prompts, text_length, padding))

    def scale_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the model's latents: `(z - shift_factor) * scaling_factor` of the VAE config."""
        return scale_latents(raw, self.vae.config)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents -> raw VAE latents (the inverse of `scale_latents`)."""
        return unscale_latents(latents, self.vae.config)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return encode(self.vae, pixels, generator).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)

    def fit_latent_rgb(self, images: int = 8, seed: int = 0) -> torch.Tensor:
        """A [C + 1, 3] latent -> RGB preview matrix fitted with this model's VAE (see `fit_latent_rgb`)."""
        return fit_latent_rgb(self, images, seed)
