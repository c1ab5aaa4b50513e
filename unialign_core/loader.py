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

import glob
import inspect
import json
import logging
import os
from typing import Optional

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config

from .checkpoint import load_into, read_safetensors, read_weights_folder
from .errors import CheckpointError
from .model import DEFAULT_TEXT_LENGTH, UniAlignModel
from .single_file import BUNDLE_PREFIXES, FORMAT, check_format_version, decode_tensor
from .text_encoder import load_mask_embedding, load_text_encoder, set_mask_embedding, t5_from_state_dict
from .transformer import ALIGN_PREFIXES, CastOps, UniAlignTransformer, low_precision_keys, use_operations
from .vae import load_vae, vae_from_state_dict

log = logging.getLogger("unialign_core")

T5_MASK_TOKEN = "<extra_id_0>"
# The scheduler SD3 ships, used when a checkpoint carries none.
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
UPSTREAM_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path")
# The transformer config entries a UniAlignment start takes from plain SD3-medium (`load_sd3_medium_start`).
SD3_CONFIG_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
)


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """SD3's VAE overflows in float16 (its config says force_upcast), so it runs in float32 then."""
    return torch.float32 if dtype == torch.float16 else dtype


def refuse_sd35(config: dict, path: str) -> None:
    """SD3.5's additions are neither a UniAlignment architecture nor a base to train one from: a clear error."""
    if config.get("dual_attention_layers"):
        raise CheckpointError(
            path,
            "dual attention layers (SD3.5) are not a UniAlignment architecture; a training start must be SD3-medium",
        )
    if config.get("qk_norm"):
        raise CheckpointError(
            path, "qk-norm (SD3.5) is not a UniAlignment architecture; a training start must be SD3-medium"
        )


def read_scheduler(folder: str) -> dict:
    """A pipeline folder's `scheduler/scheduler_config.json`, or SD3's default scheduler when it has none."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return dict(DEFAULT_SCHEDULER)
    with open(path) as f:
        return json.load(f)


def transformer_config_from_upstream(raw: dict, path: str) -> dict:
    """Turn an upstream `transformer/config.json` into our config."""
    config = {k: v for k, v in raw.items() if k not in UPSTREAM_IGNORED}
    refuse_sd35(config, path)
    config.pop("dual_attention_layers", None)
    config.pop("qk_norm", None)
    if "vocab_size" not in config:
        raise CheckpointError(path, "config has no vocab_size: this is not a UniAlignment/DualDiffusion transformer")
    known = set(inspect.signature(UniAlignTransformer.__init__).parameters)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise CheckpointError(path, f"unknown transformer config entries {unknown}")
    return config


def build_transformer(
    config: dict,
    state: dict,
    path: str,
    dtype: torch.dtype,
    operations=None,
    weight_dtype: Optional[torch.dtype] = None,
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
    folder: str,
    dtype: torch.dtype = torch.float32,
    fp16_time_projection: Optional[bool] = None,
    operations=None,
    weight_dtype: Optional[torch.dtype] = None,
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
    scheduler = read_scheduler(path)
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
            path, dtype, fp16_time_projection, operations, weight_dtype
        )
    else:
        transformer, scheduler, parts, declared_mask = _load_file(
            path, dtype, fp16_time_projection, operations, weight_dtype
        )
    return _assemble(
        path,
        transformer,
        scheduler,
        parts,
        declared_mask,
        text_encoder,
        vae,
        tokenizer,
        mask_embedding,
        dtype,
        operations,
    ).to(device)


def _assemble(
    path, transformer, scheduler, parts, declared_mask, text_encoder, vae, tokenizer, mask_embedding, dtype, operations
) -> UniAlignModel:
    """The UniAlignModel of a loaded transformer: T5, VAE and tokenizer (the arguments win over `parts`, the
    model's own), the mask id and the mask-token embedding."""
    t5 = load_text_encoder(text_encoder, dtype, operations) if text_encoder else parts["text_encoder"]
    if isinstance(t5, str):
        t5 = load_text_encoder(t5, dtype, operations)
    if t5 is None:
        raise CheckpointError(
            path,
            "no text encoder: pass a T5 encoder file (e.g. models/text_encoders/t5xxl_fp16.safetensors)",
            component="text_encoder",
        )
    autoencoder = load_vae(vae, vae_dtype(dtype)) if vae else parts["vae"]
    if isinstance(autoencoder, str):
        autoencoder = load_vae(autoencoder, vae_dtype(dtype))
    if autoencoder is None:
        raise CheckpointError(
            path, "no VAE: pass an SD3 VAE file (e.g. models/vae/sd3_vae.safetensors)", component="vae"
        )
    tok = tokenizer or parts["tokenizer"]
    if tok is None:
        raise CheckpointError(
            path, "no tokenizer: put tokenizer/ next to the model or pass a tokenizer path", component="tokenizer"
        )
    if isinstance(tok, str):
        tok = load_tokenizer(tok)
    mask_id = _mask_id(tok, declared_mask)

    mask_source = mask_embedding or parts["mask_embedding"]
    mask_vector = load_mask_embedding(mask_source) if isinstance(mask_source, str) else mask_source
    if mask_vector is not None:
        set_mask_embedding(t5, mask_vector, mask_id, mask_source if isinstance(mask_source, str) else path)
    return UniAlignModel(
        transformer,
        autoencoder,
        t5,
        tok,
        scheduler,
        mask_id,
        path,
        mask_vector,
        parts.get("text_length", DEFAULT_TEXT_LENGTH),
    )


def sd3_transformer_config(raw: dict, vocab_size: int, fp16_time_projection: bool = False, path: str = "") -> dict:
    """Our transformer config from a diffusers SD3Transformer2DModel config (SD3-medium; SD3.5 is refused)."""
    refuse_sd35(raw, path)
    missing = [k for k in SD3_CONFIG_KEYS if k not in raw]
    if missing:
        raise CheckpointError(path, f"SD3 transformer config lacks {missing}")
    config = {k: raw[k] for k in SD3_CONFIG_KEYS}
    config.update(vocab_size=vocab_size, fp16_time_projection=fp16_time_projection)
    return config


def _read_sd3(path: str, components: dict):
    """(transformer config, state, scheduler, component paths) of an SD3 pipeline folder, `transformer/` folder
    or transformer file; `components` (text_encoder, vae, tokenizer paths or None) win over the folder's own."""
    folder = path if os.path.isdir(path) else None
    parts = dict(components)
    scheduler = dict(DEFAULT_SCHEDULER)
    if folder and os.path.isdir(os.path.join(folder, "transformer")):
        for name, subs in (
            ("text_encoder", ("text_encoder_3",)),
            ("vae", ("vae",)),
            ("tokenizer", ("tokenizer_3", "tokenizer")),
        ):
            parts[name] = parts[name] or _first_dir(folder, subs)
        scheduler = read_scheduler(folder)
        folder = os.path.join(folder, "transformer")
    if folder:
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        state = read_weights_folder(folder, "diffusion_pytorch_model")
    else:
        state, meta = read_safetensors(path)
        sibling = os.path.join(os.path.dirname(path), "config.json")
        if "config" in meta:
            raw = json.loads(meta["config"])
        elif os.path.isfile(sibling):
            with open(sibling) as f:
                raw = json.load(f)
        else:
            raise CheckpointError(path, "an SD3 transformer file needs its config.json beside it")
    missing = [n for n in ("text_encoder", "vae", "tokenizer") if parts[n] is None]
    if missing:
        raise CheckpointError(
            path,
            f"starting from SD3 needs {', '.join(missing)} (a training config's "
            f"{', '.join('init.' + m for m in missing)}), or an SD3 pipeline folder with "
            "text_encoder_3/, vae/, tokenizer_3/",
        )
    return raw, state, scheduler, parts


def load_sd3_medium_start(
    path: str, *, text_encoder: Optional[str] = None, vae: Optional[str] = None, tokenizer: Optional[str] = None,
    mask_embedding: Optional[str] = None, fp16_time_projection: bool = False, align_dim: Optional[int] = None,
):  # fmt: skip
    """Plain SD3-medium (diffusers layout) as the start of a UniAlignment model: (model, sd3_state), on the CPU in
    float32.

    `path`: a pipeline folder (`transformer/ text_encoder_3/ tokenizer_3/ vae/ scheduler/`), a `transformer/`
    folder or a transformer .safetensors (with its config.json beside it); the other arguments give or override
    the T5 encoder, VAE, tokenizer and mask-token embedding. SD3.5 is refused. The model's transformer is a fresh
    UniAlignTransformer of SD3-medium's shape (vocabulary: the tokenizer's; with alignment projectors of size
    `align_dim`); no weights are loaded into it: `sd3_state` holds SD3's tensors under SD3's names, for the caller
    to map (train/init.py does, with its report)."""
    components = {"text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    raw, state, scheduler, parts = _read_sd3(path, components)
    tok = load_tokenizer(parts["tokenizer"])
    tok.pad_token = tok.pad_token or tok.eos_token
    config = sd3_transformer_config(raw, len(tok), bool(fp16_time_projection), path)
    transformer = UniAlignTransformer(**config, align_dim=align_dim)
    parts.update(tokenizer=tok, mask_embedding=None)
    model = _assemble(path, transformer, scheduler, parts, None, None, None, None, mask_embedding, torch.float32, None)
    return model, state
