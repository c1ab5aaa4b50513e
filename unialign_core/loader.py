"""One loader for every format users have.

    load_model(path, text_encoder=None, vae=None, tokenizer=None, mask_embedding=None, ...)

`path` is either
  * an upstream diffusers pipeline folder (`transformer/ vae/ text_encoder/ tokenizer/ scheduler/`),
    from UniAlignment or DualDiffusion, or
  * our single `.safetensors` file (see `single_file.py`).

The other arguments override or supply components: a T5 encoder folder or single file (e.g.
ComfyUI's `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`), a VAE folder or single
file, a tokenizer folder or `tokenizer.json`, and the official mask-token embedding file.

Mask row of T5 (id 32099 for the T5 tokenizer), first match wins:
  1. the `mask_embedding` argument;
  2. the embedding stored in our single file;
  3. a `mask_token_emb*.pth` in the model folder (or its `checkpoint/` subfolder);
  4. otherwise the text encoder's own row is kept (a checkpoint whose text encoder already
     holds the trained row needs nothing more).
"""

import contextlib
import glob
import inspect
import json
import logging
import os
from typing import List, Optional

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config

from .checkpoint import load_into, read_safetensors, read_weights_folder
from .errors import CheckpointError
from .single_file import BUNDLE_PREFIXES, FORMAT, check_format_version, decode_tensor
from .text_encoder import load_mask_embedding, load_text_encoder, set_mask_embedding, t5_from_state_dict
from .transformer import ALIGN_PREFIXES, CastOps, UniAlignTransformer, low_precision_keys, use_operations
from .vae import decode, encode, load_vae, vae_from_state_dict

log = logging.getLogger("unialign_core")

T5_MASK_TOKEN = "<extra_id_0>"
DEFAULT_TEXT_LENGTH = 256  # T5 tokens per prompt in the published training
# The scheduler SD3 ships, used when a checkpoint carries none.
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
UPSTREAM_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path")


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """SD3's VAE overflows in float16 (its config says force_upcast), so it runs in float32 then."""
    return torch.float32 if dtype == torch.float16 else dtype


def transformer_config_from_upstream(raw: dict, path: str) -> dict:
    """Turn an upstream `transformer/config.json` into our config."""
    config = {k: v for k, v in raw.items() if k not in UPSTREAM_IGNORED}
    if config.pop("dual_attention_layers", None):
        raise CheckpointError(path, "dual attention layers (SD3.5) are not a UniAlignment architecture")
    if config.pop("qk_norm", None):
        raise CheckpointError(path, "qk-norm (SD3.5) is not a UniAlignment architecture")
    if "vocab_size" not in config:
        raise CheckpointError(path, "config has no vocab_size: this is not a UniAlignment/DualDiffusion transformer")
    known = set(inspect.signature(UniAlignTransformer.__init__).parameters)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise CheckpointError(path, f"unknown transformer config entries {unknown}")
    return config


def build_transformer(
    config: dict, state: dict, path: str, dtype: torch.dtype, operations=None, weight_dtype: Optional[torch.dtype] = None
) -> UniAlignTransformer:
    """Build on the meta device and load the weights; training-only projectors are skipped.

    `operations`: the layer classes for the linear layers (e.g. ComfyUI's `comfy.ops`; default torch.nn).
    `weight_dtype`: store the joint blocks' linear weights in this dtype (fp8) and compute in `dtype`; each such
    layer upcasts its weight per call (`CastOps` unless `operations` is given; then it must cast too)."""
    config = dict(config, align_dim=None)
    with torch.device("meta"):
        model = UniAlignTransformer(**config)
    low = weight_dtype is not None and weight_dtype != dtype
    use_operations(model, CastOps if low and operations is None else operations)
    ignore = ALIGN_PREFIXES + BUNDLE_PREFIXES
    if low:  # each tensor goes straight to its stored dtype: the model is never held twice
        stored = set(low_precision_keys(model))
        state = {
            k: v if k.startswith(ignore) or not v.is_floating_point() else v.to(weight_dtype if k in stored else dtype)
            for k, v in state.items()
        }
        dtype = None
    return load_into(model, state, path, "UniAlignment transformer", dtype, ignore).eval().requires_grad_(False)


def load_transformer(
    folder: str, dtype: torch.dtype = torch.float32, fp16_time_projection: Optional[bool] = None,
    operations=None, weight_dtype: Optional[torch.dtype] = None,
) -> UniAlignTransformer:
    """Load a released `transformer/` folder (config.json + safetensors, sharded or not)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(folder, "no config.json in this transformer folder")
    with open(config_path) as f:
        config = transformer_config_from_upstream(json.load(f), config_path)
    state = read_weights_folder(folder, "diffusion_pytorch_model")
    if fp16_time_projection is not None:
        config["fp16_time_projection"] = fp16_time_projection
    return build_transformer(config, state, folder, dtype, operations, weight_dtype)


def load_tokenizer(path: str):
    """A tokenizer from a folder, or a tokenizer.json file."""
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    if os.path.isfile(path) and path.endswith(".json"):
        return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    raise CheckpointError(path, "not a tokenizer folder or tokenizer.json")


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

    def tokenize(self, texts: List[str], max_length: int) -> torch.Tensor:
        """Token ids padded to max_length; logs what a too-long text lost."""
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        for text, ids in zip(texts, full):
            if len(ids) > max_length:
                lost = self.tokenizer.decode(ids[max_length - 1 : -1])
                log.warning("prompt longer than %d tokens; this part was dropped: %r", max_length, lost)
        batch = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"]

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """T5 states for token ids, with no attention mask (as published)."""
        with self.text_encoder_scope() if self.text_encoder_scope else contextlib.nullcontext():
            ids = ids.to(self.text_encoder.shared.weight.device)
            return self.text_encoder(input_ids=ids)[0].to(self.dtype)

    def encode_prompts(self, prompts: List[str], max_length: Optional[int] = None) -> torch.Tensor:
        """T5 states of prompts padded to `max_length` tokens (default: the length the model was trained with)."""
        return self.encode_ids(self.tokenize(prompts, max_length or self.text_length))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return encode(self.vae, pixels, generator).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)


def _find_mask_file(folder: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, "mask_token_emb*.pth")))
    found += sorted(glob.glob(os.path.join(folder, "checkpoint", "mask_token_emb*.pth")))
    return found[0] if found else None


def _first_dir(folder: str, names) -> Optional[str]:
    for name in names:
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _mask_id(tokenizer, declared: Optional[int] = None) -> int:
    if declared is not None:
        return declared
    mask = tokenizer.convert_tokens_to_ids(T5_MASK_TOKEN)
    if mask is None or mask == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {T5_MASK_TOKEN} token to use as the mask")
    return mask


def _load_folder(path, dtype, fp16_time_projection, operations=None, weight_dtype=None):
    """Components of an upstream pipeline folder."""
    transformer_dir = _first_dir(path, ["transformer"])
    if transformer_dir is None:
        raise CheckpointError(path, "not a model folder: no transformer/ subfolder")
    if fp16_time_projection is None:
        # DualDiffusion does not round the time projection; UniAlignment does.
        index_path = os.path.join(path, "model_index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                if "dual" in json.load(f).get("_class_name", "").lower():
                    fp16_time_projection = False
    transformer = load_transformer(transformer_dir, dtype, fp16_time_projection, operations, weight_dtype)
    scheduler = dict(DEFAULT_SCHEDULER)
    scheduler_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_path):
        with open(scheduler_path) as f:
            scheduler = json.load(f)
    parts = {
        "text_encoder": _first_dir(path, ["text_encoder", "text_encoder_3"]),
        "vae": _first_dir(path, ["vae"]),
        "tokenizer": _first_dir(path, ["tokenizer", "tokenizer_3"]),
        "mask_embedding": _find_mask_file(path),
    }
    return transformer, scheduler, parts, None


def _load_file(path, dtype, fp16_time_projection, operations=None, weight_dtype=None):
    """Components of our single-file format."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        hint = "a plain transformer or another model" if tensors else "an empty file"
        raise CheckpointError(
            path, f"not a UniAlignment single file (no format={FORMAT!r} metadata; looks like {hint})"
        )
    check_format_version(meta, path)
    try:
        config = json.loads(meta["model_config"])
        scheduler = json.loads(meta["scheduler_config"])
        mask_id = int(meta["mask_id"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(path, f"damaged metadata header: {e}") from None
    if fp16_time_projection is not None:
        config["fp16_time_projection"] = fp16_time_projection
    transformer = build_transformer(config, tensors, path, dtype, operations, weight_dtype)
    parts = {"text_encoder": None, "vae": None, "tokenizer": None, "mask_embedding": None}
    if "text_length" in meta:  # written by the trainer's export: its prompt length
        if not meta["text_length"].isdigit() or int(meta["text_length"]) < 1:
            raise CheckpointError(path, f"damaged metadata header: text_length {meta['text_length']!r}")
        parts["text_length"] = int(meta["text_length"])
    if "text_encoder_config" in meta:
        t5_state = {k[len("text_encoder.") :]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
        t5_config = T5Config(**json.loads(meta["text_encoder_config"]))
        parts["text_encoder"] = t5_from_state_dict(t5_state, path, dtype, t5_config, operations)
    if "vae_config" in meta:
        vae_state = {k[len("vae.") :]: v for k, v in tensors.items() if k.startswith("vae.")}
        parts["vae"] = vae_from_state_dict(vae_state, json.loads(meta["vae_config"]), path, vae_dtype(dtype))
    if "tokenizer" in meta:
        special = json.loads(meta.get("tokenizer_special", "{}"))
        parts["tokenizer"] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(meta["tokenizer"]), **special)
    else:  # a tokenizer/ folder or a tokenizer.json beside the file
        folder = os.path.dirname(os.path.abspath(path))
        beside = os.path.join(folder, "tokenizer.json")
        parts["tokenizer"] = _first_dir(folder, ["tokenizer"]) or (beside if os.path.isfile(beside) else None)
    if "mask_embedding" in meta:
        parts["mask_embedding"] = decode_tensor(meta["mask_embedding"])
    return transformer, scheduler, parts, mask_id


def load_model(
    path: str,
    *,
    text_encoder: Optional[str] = None,
    vae: Optional[str] = None,
    tokenizer: Optional[str] = None,
    mask_embedding: Optional[str] = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    fp16_time_projection: Optional[bool] = None,
    weight_dtype: Optional[torch.dtype] = None,
    operations=None,
) -> UniAlignModel:
    """Load a UniAlignment or DualDiffusion model in any supported format.

    Args:
        path: upstream pipeline folder, or our single `.safetensors` file.
        text_encoder: T5 encoder folder or single file (overrides the model's own).
        vae: VAE folder or single file (overrides the model's own).
        tokenizer: tokenizer folder or tokenizer.json (overrides the model's own).
        mask_embedding: the official mask-token embedding file (.pth or .safetensors).
        device: where to put the model.
        dtype: weight dtype of the transformer, VAE and T5 (fp8 T5 weights stay fp8).
        fp16_time_projection: force UniAlignment's float16 timestep rounding on or off
            (default: on, except for DualDiffusion folders).
        weight_dtype: store the transformer's block linear weights in this dtype (e.g. torch.float8_e4m3fn),
            computing in `dtype` (each layer upcasts per call); None: `dtype`.
        operations: layer classes for the linear layers of the transformer and T5, e.g. ComfyUI's
            `comfy.ops.disable_weight_init` so that ComfyUI can load them in part; default torch.nn.
    Raises:
        CheckpointError: a file is missing, unreadable, or of the wrong architecture.
    """
    if not os.path.exists(path):
        raise CheckpointError(path, "model not found")
    if os.path.isdir(path):
        transformer, scheduler, parts, declared_mask = _load_folder(
            path, dtype, fp16_time_projection, operations, weight_dtype)
    else:
        transformer, scheduler, parts, declared_mask = _load_file(
            path, dtype, fp16_time_projection, operations, weight_dtype)

    t5 = load_text_encoder(text_encoder, dtype, operations) if text_encoder else parts["text_encoder"]
    if isinstance(t5, str):
        t5 = load_text_encoder(t5, dtype, operations)
    if t5 is None:
        raise CheckpointError(path, "no text encoder: pass a T5 encoder file (e.g. models/text_encoders/t5xxl_fp16.safetensors)",
                              component="text_encoder")
    autoencoder = load_vae(vae, vae_dtype(dtype)) if vae else parts["vae"]
    if isinstance(autoencoder, str):
        autoencoder = load_vae(autoencoder, vae_dtype(dtype))
    if autoencoder is None:
        raise CheckpointError(path, "no VAE: pass an SD3 VAE file (e.g. models/vae/sd3_vae.safetensors)", component="vae")
    tok = tokenizer or parts["tokenizer"]
    if tok is None:
        raise CheckpointError(path, "no tokenizer: put tokenizer/ next to the model or pass a tokenizer path",
                              component="tokenizer")
    if isinstance(tok, str):
        tok = load_tokenizer(tok)
    mask_id = _mask_id(tok, declared_mask)

    mask_source = mask_embedding or parts["mask_embedding"]
    mask_vector = load_mask_embedding(mask_source) if isinstance(mask_source, str) else mask_source
    if mask_vector is not None:
        set_mask_embedding(t5, mask_vector, mask_id, mask_source if isinstance(mask_source, str) else path)
    model = UniAlignModel(transformer, autoencoder, t5, tok, scheduler, mask_id, path, mask_vector,
                          parts.get("text_length", DEFAULT_TEXT_LENGTH))
    return model.to(device)
