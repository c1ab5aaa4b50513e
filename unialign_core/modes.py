"""The six modes: text-to-image, edit, perceive, compose, caption and answer.

Every mode is deterministic for a given seed (noise is drawn on the CPU), takes an optional
`callback(step, total, state)` and an optional `cancel()` check (return True to stop, which
raises `Cancelled`, or raise your own exception), and leaves the model unchanged.

Images in and out are float tensors [B, 3, H, W] in [0, 1] (PIL images are accepted too).
Sides must be multiples of `model.pixel_multiple` (16 for SD3's VAE with patch size 2).
A bad argument raises `InputError` (a ValueError) whose `name` is the argument ("image", "reference 2", ...).
"""

import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from .errors import InputError, check_finite, check_text
from .flow_sampler import flow_sigmas, sample_flow
from .images import ImageInput, check_fits, check_size, resize_and_crop, resize_to_area, to_tensor
from .model import VQA_TEMPLATE, describe_cut  # noqa: F401  (VQA_TEMPLATE lives with the model; importable here)
from .text_sampler import CachedTextDenoiser, TextDenoiser, sample_confidence, sample_ddpm_cache
from .vae import cancellable

PERCEPTION_PRESETS = {
    "depth": "Provide a detailed depth map of the entire scene.",  # the published instruction
    "canny": "Provide a detailed canny edge map of the entire scene.",
    "pose": "Provide a detailed human pose map of the entire scene.",
}
SHORT_ANSWER_SUFFIX = " Answer the question using a single word or phrase."
SAMPLERS = ("confidence", "ddpm_cache")
RESIZE_POLICIES = ("trained", "crop", "as_is")
PUBLISHED_SIDE = 512  # UniAlignment's training size; its transformer config keeps SD3-medium's 1024 px default
# A prompt with more than this share of its characters unknown to T5's tokenizer (<unk>, which the model cannot see)
# gets a warning: typically a language T5 does not read.
UNKNOWN_SHARE = 0.1
T5_LANGUAGES = (
    "T5 reads English (and some German, French and Romanian): Chinese, Japanese, Korean, Thai, Arabic and other "
    "scripts, and some symbols, become <unk> and are ignored"
)


@dataclass
class ImageResult:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    latents: torch.Tensor  # [B, C, h, w], scaled SD3 latents


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def _check_guidance(negative_prompt: str, guidance: float, image_guidance: Optional[float] = None) -> None:
    """The guidance settings every image mode takes, checked before any work."""
    check_text("negative_prompt", negative_prompt)
    check_finite("guidance", guidance)
    if image_guidance is not None:
        check_finite("image_guidance", image_guidance)


def _check_prompt(prompt: str, name: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(name, "is empty; describe what you want", sep=" ")
    return check_text(name, prompt)


def max_image_side(model) -> int:
    """The longest image side (pixels) the model's learned position table covers: 3072 for the released model."""
    return model.transformer.config.pos_embed_max_size * model.pixel_multiple


def trained_side(model) -> int:
    """The image side the model was trained at (about side x side pixels): a `resolution` the model declares,
    else its transformer's `sample_size` in pixels, at most the published 512 (32 px for the shapes model)."""
    side = getattr(model, "resolution", None) or min(
        model.transformer.config.sample_size * model.vae_scale, PUBLISHED_SIDE
    )
    return max(model.pixel_multiple, round(side / model.pixel_multiple) * model.pixel_multiple)


def check_image_size(model, width: int, height: int, name: str = "image") -> None:
    """Sides multiples of `model.pixel_multiple` and within the position table; checked before any work."""
    check_size(width, height, model.pixel_multiple, name)
    check_fits(width, height, max_image_side(model), model.pixel_multiple, name)


def prompt_overflow(model, prompt: str, text_length: Optional[int] = None) -> Optional[str]:
    """The end of a prompt that does not fit the model's T5 length (`model.text_length` tokens, 256 for the
    released model) and is dropped, as text; None when it fits."""
    limit = text_length or model.text_length
    ids = model.tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
    if len(ids) <= limit:
        return None
    return model.tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()


def prompt_notes(model, text: str, name: str = "prompt", text_length: Optional[int] = None) -> List[str]:
    """What to tell the user about a prompt before it is used, each note starting with `name`: that its end does not
    fit the model's T5 length (`model.text_length` tokens) and is cut (how many tokens, and the first words: never
    the whole cut text), and that more than `UNKNOWN_SHARE` of its characters are unknown to T5's tokenizer (the
    model does not see them). Raises InputError(name) for text no tokenizer reads (a lone surrogate)."""
    check_text(name, text)
    if not isinstance(text, str) or not text.strip():
        return []
    tokenizer = model.tokenizer
    try:
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        encoded, offsets = tokenizer(text, add_special_tokens=True), None
    ids = encoded["input_ids"]
    notes = []
    cut = describe_cut(tokenizer, ids, text_length or model.text_length)
    if cut:
        notes.append(f"{name}: {cut}")
    unknown = _unknown_share(tokenizer, text, ids, offsets)
    if unknown is not None and unknown[0] > UNKNOWN_SHARE:
        share, examples = unknown
        shown = ", ".join(repr(e) for e in examples)
        notes.append(
            f"{name}: {share:.0%} of its characters are unknown to the T5 tokenizer and ignored (e.g. {shown}); "
            f"{T5_LANGUAGES}. Write the {name} in English."
        )
    return notes


def _unknown_share(tokenizer, text: str, ids: List[int], offsets):
    """(share of the text's non-space characters that T5's tokenizer turns into <unk>, up to 3 of those pieces),
    or None when the tokenizer has no unknown token; by tokens when there are no character offsets."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return None
    if offsets is None:
        special = set(tokenizer.all_special_ids) - {unk}
        words = [i for i in ids if i not in special]
        return (sum(i == unk for i in words) / max(1, len(words)), [])
    spans = [(a, b) for i, (a, b) in zip(ids, offsets) if i == unk and b > a]
    total = sum(not c.isspace() for c in text)
    unknown = sum(not c.isspace() for a, b in spans for c in text[a:b])
    examples = []
    for a, b in spans:
        piece = text[a:b].strip()[:12]
        if piece and piece not in examples:
            examples.append(piece)
        if len(examples) == 3:
            break
    return (unknown / max(1, total), examples)


def _source_latents(model, images: ImageInput, name: str, generator: torch.Generator, cancel=None) -> torch.Tensor:
    pixels = to_tensor(images, name)
    check_image_size(model, pixels.shape[-1], pixels.shape[-2], name)
    with cancellable(model.vae, cancel):
        return model.encode_images(pixels.to(model.device), generator)


def _generate(
    model,
    *,
    prompts: List[str],
    negative_prompt: str,
    conditions: List[torch.Tensor],
    width: int,
    height: int,
    steps: int,
    guidance: float,
    image_guidance: Optional[float],
    generator: torch.Generator,
    text_length: Optional[int],
    callback,
    cancel,
    noise: Optional[torch.Tensor] = None,
) -> ImageResult:
    """The shared flow-matching loop with batched cond/uncond CFG (and optional image CFG)."""
    check_image_size(model, width, height, "width/height")
    batch = len(prompts)
    scale = model.vae_scale
    channels = model.transformer.config.in_channels
    shape = (batch, channels, height // scale, width // scale)
    if noise is None:
        noise = torch.randn(shape, generator=generator)
    elif tuple(noise.shape) != shape:
        raise InputError("noise", f"expected shape {shape}, got {tuple(noise.shape)}")
    latents = noise.to(model.device, model.dtype)
    use_cfg = guidance > 1.0
    if use_cfg:  # one T5 call for both halves: [negative..., positive...]
        context = model.encode_prompts([negative_prompt] * batch + prompts, text_length)
        negative = context[:batch]
    else:
        context = model.encode_prompts(prompts, text_length)
    conds = [torch.cat([c, c]) for c in conditions] if use_cfg else conditions
    use_image_cfg = bool(conditions) and image_guidance is not None and image_guidance != 1.0 and use_cfg

    def velocity(x, t):
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.cat([t, t]) if use_cfg else t
        v = model.transformer(x_in, context, t_in.to(model.dtype), conds, compute_text=False).velocity
        if not use_cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        if not use_image_cfg:
            return v_uncond + guidance * (v_cond - v_uncond)
        # Three-way CFG: no text and no image / image only / text and image.
        v_none = model.transformer(x, negative, t.to(model.dtype), None, compute_text=False).velocity
        return v_none + image_guidance * (v_uncond - v_none) + guidance * (v_cond - v_uncond)

    seq_len = (height // scale // model.transformer.config.patch_size) * (
        width // scale // model.transformer.config.patch_size
    )
    sigmas = flow_sigmas(model.scheduler_config, steps, seq_len)
    with torch.no_grad():
        latents = sample_flow(velocity, latents, sigmas, callback, cancel)
        with cancellable(model.vae, cancel):
            images = model.decode_latents(latents)
    return ImageResult(images.cpu(), latents.cpu())


def text_to_image(
    model,
    prompt: str,
    *,
    negative_prompt: str = "",
    width: int = 512,
    height: int = 512,
    steps: int = 28,
    guidance: float = 7.0,
    seed: int = 0,
    num_images: int = 1,
    text_length: Optional[int] = None,
    noise: Optional[torch.Tensor] = None,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> ImageResult:
    """Generate `num_images` images for a prompt (trained at 512x512; sides a multiple of 16).

    `noise` replaces the seeded initial latents ([num_images, C, height/8, width/8]). `text_length` is the
    number of T5 tokens per prompt (default: what the model was trained with, `model.text_length`: 256 for the
    released weights, the trainer's `data.text_length` for its exports); the other image modes take it too.
    """
    _check_prompt(prompt)
    _check_guidance(negative_prompt, guidance)
    return _generate(
        model, prompts=[prompt] * num_images, negative_prompt=negative_prompt, conditions=[], width=width,
        height=height, steps=steps, guidance=guidance, image_guidance=None, generator=_generator(seed),
        text_length=text_length, callback=callback, cancel=cancel, noise=noise,
    )  # fmt: skip


def edit(
    model,
    image: ImageInput,
    instruction: str,
    *,
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 7.0,
    image_guidance: Optional[float] = None,
    seed: int = 0,
    num_images: int = 1,
    text_length: Optional[int] = None,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> ImageResult:
    """Edit each source image by an instruction; the output has the source's size.

    The source latents are appended as condition tokens. CFG is on the text only, as published
    (the uncond branch keeps the source). `image_guidance` (e.g. 1.5) adds a third branch
    without the source image (InstructPix2Pix-style); None keeps the published two-way CFG.
    """
    _check_prompt(instruction, "instruction")
    _check_guidance(negative_prompt, guidance, image_guidance)
    generator = _generator(seed)
    source = _source_latents(model, image, "image", generator, cancel)
    source = source.repeat_interleave(num_images, dim=0)
    height, width = (s * model.vae_scale for s in source.shape[-2:])
    return _generate(
        model, prompts=[instruction] * source.shape[0], negative_prompt=negative_prompt, conditions=[source],
        width=width, height=height, steps=steps, guidance=guidance, image_guidance=image_guidance,
        generator=generator, text_length=text_length, callback=callback, cancel=cancel,
    )  # fmt: skip


def perceive(
    model,
    image: ImageInput,
    task: str = "depth",
    *,
    instruction: Optional[str] = None,
    **kwargs,
) -> ImageResult:
    """Depth, canny-edge or pose maps (the edit path with a preset instruction).

    `task` is one of PERCEPTION_PRESETS, or "custom" with your own `instruction`.
    Other keyword arguments are those of `edit`.
    """
    if instruction is None:
        if task not in PERCEPTION_PRESETS:
            known = sorted(PERCEPTION_PRESETS)
            raise InputError("task", f"{task!r} is not one of {known}; or pass an instruction", sep=" ")
        instruction = PERCEPTION_PRESETS[task]
    return edit(model, image, instruction, **kwargs)


def compose(
    model,
    references: Sequence[ImageInput],
    prompt: str,
    *,
    width: int = 512,
    height: int = 512,
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 7.0,
    seed: int = 0,
    num_images: int = 1,
    text_length: Optional[int] = None,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> ImageResult:
    """Personalise / compose: generate from a prompt and 1-3 reference images (any sizes, multiples of 16)."""
    _check_prompt(prompt)
    _check_guidance(negative_prompt, guidance)
    if not 1 <= len(references) <= 3:
        raise InputError("references", f"give 1 to 3 reference images, got {len(references)}")
    check_image_size(model, width, height, "width/height")  # before any reference is encoded
    for i, ref in enumerate(references):
        pixels = to_tensor(ref, f"reference {i + 1}")
        check_image_size(model, pixels.shape[-1], pixels.shape[-2], f"reference {i + 1}")
        if pixels.shape[0] != 1:
            raise InputError(f"reference {i + 1}", f"give one image per reference, got a batch of {pixels.shape[0]}")
    generator = _generator(seed)
    conditions = []
    for i, ref in enumerate(references):
        latents = _source_latents(model, ref, f"reference {i + 1}", generator, cancel)
        conditions.append(latents.expand(num_images, -1, -1, -1))
    return _generate(
        model, prompts=[prompt] * num_images, negative_prompt=negative_prompt, conditions=conditions, width=width,
        height=height, steps=steps, guidance=guidance, image_guidance=None, generator=generator,
        text_length=text_length, callback=callback, cancel=cancel,
    )  # fmt: skip


def _read_image(model, image, *, question: Optional[str], short: bool, resize, resolution, **options):
    """`caption` (no `question`) and `answer`: the image as read (`understanding_input`), the question's tokens
    (frozen), then `_understand` with the other `options`."""
    image = understanding_input(model, image, resize, resolution)
    prompt_ids = (
        [] if question is None else model.question_ids(question.strip() + (SHORT_ANSWER_SUFFIX if short else ""))
    )
    return _understand(model, image, prompt_ids=prompt_ids, **options)


def _understand(
    model,
    image,
    *,
    prompt_ids: List[int],
    answer_tokens,
    steps,
    sampler,
    seed,
    temperature,
    callback,
    cancel,
    threshold=None,
    refresh=1,
):
    if sampler not in SAMPLERS:
        raise InputError("sampler", f"{sampler!r} is not one of {SAMPLERS}", sep=" ")
    if sampler == "ddpm_cache" and (threshold is not None or refresh != 1):
        raise InputError(
            "threshold" if threshold is not None else "refresh",
            "applies to the confidence sampler only; ddpm_cache runs as published",
            sep=" ",
        )
    if steps < 1:
        raise InputError("steps", f"must be at least 1, got {steps}", sep=" ")
    if len(prompt_ids) >= answer_tokens:
        raise InputError(
            "answer_tokens", f"the question uses {len(prompt_ids)} tokens; raise it above that (now {answer_tokens})"
        )
    generator = _generator(seed)
    pixels = to_tensor(image, "image")  # caption/answer have applied the resize policy (understanding_input)
    latents = _source_latents(model, pixels, "image", generator, cancel)
    batch = latents.shape[0]
    x = torch.full((batch, answer_tokens), model.mask_id, dtype=torch.long)
    x[:, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    if sampler == "ddpm_cache":
        ids = sample_ddpm_cache(TextDenoiser(model, latents), x, model.mask_id, steps, generator, callback, cancel)
    else:
        denoiser = TextDenoiser(model, latents) if refresh == 1 else CachedTextDenoiser(model, latents, refresh)
        ids = sample_confidence(
            denoiser, x, model.mask_id, model.eos_id, steps, generator, temperature, callback, cancel, threshold
        )
    return [decode_answer(model.tokenizer, row[len(prompt_ids) :].tolist()) for row in ids.cpu()]


def understanding_input(model, image: ImageInput, resize: str = "trained", resolution="auto") -> torch.Tensor:
    """The image as the understanding modes read it, [B, 3, H, W] with sides multiples of `model.pixel_multiple`.

    resize: "trained" (default) scales it up or down to about side x side pixels in area, aspect kept;
        "crop" is the official preprocessing: the shorter side scaled to `side`, then a centre crop to side x side;
        "as_is" keeps its size (odd sides rounded to the nearest multiple).
    resolution: the side; "auto" is the size the model was trained at (`trained_side`: 512 for the released
        model, 32 for the shapes model). None means "as_is" (as before).
    """
    if resize not in RESIZE_POLICIES:
        raise InputError("resize", f"{resize!r} is not one of {RESIZE_POLICIES}", sep=" ")
    pixels = to_tensor(image, "image")
    if resolution is None:
        resize = "as_is"
    side = trained_side(model) if resolution in ("auto", None) else int(resolution)
    if resize == "trained":
        return resize_to_area(pixels, side, model.pixel_multiple)
    if resize == "crop":
        return resize_and_crop(pixels, side, model.pixel_multiple)
    return resize_to_area(pixels, (pixels.shape[-1] * pixels.shape[-2]) ** 0.5, model.pixel_multiple)


def decode_answer(tokenizer, ids: List[int]) -> str:
    """Text up to the first end-of-text, without special tokens."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def caption(
    model,
    image: ImageInput,
    *,
    answer_tokens: int = 128,
    steps: int = 32,
    sampler: str = "confidence",
    seed: int = 0,
    temperature: float = 0.0,
    resize: str = "trained",
    resolution="auto",
    threshold: Optional[float] = None,
    refresh: int = 1,
    callback: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> List[str]:
    """One caption per image by masked text diffusion.

    Args:
        answer_tokens: the text tokens to generate (published: 256; captions rarely need more than 128); for
            `answer` they include the question's.
        steps: denoising steps (published: 32). The confidence sampler may stop earlier.
        sampler: "confidence" (fast, stops at end-of-text) or "ddpm_cache" (the published MDLM sampler).
        temperature: confidence sampler only; 0 is greedy.
        threshold: confidence sampler only; also commit, in one step, every masked token at least this
            probable (e.g. 0.9). None: the plain top-k schedule.
        refresh: confidence sampler only; run the image tokens every `refresh` steps and, between, the
            text tokens alone against their cached keys and values. 1 (default) is exact; more is faster
            and approximate (README, "Understanding samplers").
        resize: "trained" (default): scaled up or down to about the trained size in area (512x512 for the
            released model, aspect kept, sides multiples of 16); "crop": the official resize of the shorter
            side and centre crop to a square; "as_is": its own size, rounded to multiples of 16.
        resolution: the side for "trained" and "crop"; "auto" (default) reads it from the model
            (`trained_side`); None keeps the image's size (same as resize="as_is").
    """
    return _read_image(question=None, short=False, **locals())  # locals(): exactly the arguments


def answer(model, image: ImageInput, question: str, *, short: bool = False, **options) -> List[str]:
    """Answer a question about each image with the published `Q: ... A: ` prompt.

    The question's tokens are frozen (without the tokenizer's trailing end-of-text) and the
    answer fills the rest. `short=True` appends the SFT hint for one-word answers.
    Other arguments are those of `caption`, with its defaults.
    """
    arguments = inspect.signature(caption).bind(model, image, **options)  # TypeError for one caption does not take
    arguments.apply_defaults()
    _check_prompt(question, "question")
    return _read_image(question=question, short=short, **arguments.arguments)
