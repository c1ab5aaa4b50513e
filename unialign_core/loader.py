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
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config

from .checkpoint import load_into, read_safetensors, read_weights_folder
from .errors import CheckpointError
from .flow_sampler import flow_sigmas
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


# ---- what a file may say -----------------------------------------------------------------------------------------
# Every number a model file's metadata or config gives (sizes, counts, widths, lengths) is checked against this one
# table before anything is built or allocated, so that a damaged or hostile file is refused with its file, key,
# value and bound instead of exhausting memory (a text_length of 1e9 once aborted the whole ComfyUI process) or
# time (4000 layers kept the loader busy for 42 s). The bounds sit well above the released models (UniAlignment:
# 24 layers, 24 heads x 64, joint_attention_dim 4096, pos_embed_max_size 192, vocab 32100, text_length 256; T5-XXL:
# 24 layers, 64 heads x 64, d_model 4096, d_ff 10240; SD3's VAE: 4 blocks of at most 512 channels, 16 latent
# channels) and admit tiny test models (every lower bound is 1, or 0 where 0 means something).


class Whole(NamedTuple):
    """A whole number from `low` to `high`."""

    low: int
    high: int


class Real(NamedTuple):
    """A finite number from `low` to `high`."""

    low: float
    high: float


class Wholes(NamedTuple):
    """A list of 1 to `most` whole numbers, each from `low` to `high`."""

    most: int
    low: int
    high: int


LIMITS = {
    "transformer": {
        "vocab_size": Whole(1, 262144),
        "sample_size": Whole(1, 4096),
        "patch_size": Whole(1, 16),
        "in_channels": Whole(1, 256),
        "out_channels": Whole(1, 256),
        "num_layers": Whole(1, 64),
        "attention_head_dim": Whole(1, 512),
        "num_attention_heads": Whole(1, 256),
        "inner_dim": Whole(1, 16384),  # num_attention_heads x attention_head_dim
        "joint_attention_dim": Whole(1, 16384),
        "caption_projection_dim": Whole(1, 16384),
        "pooled_projection_dim": Whole(1, 16384),
        "pos_embed_max_size": Whole(1, 1024),
        "align_dim": Whole(1, 16384),
        "align_hidden_dim": Whole(1, 16384),
    },
    "text_encoder": {
        "vocab_size": Whole(1, 262144),
        "d_model": Whole(1, 16384),
        "d_kv": Whole(1, 1024),
        "d_ff": Whole(1, 65536),
        "num_layers": Whole(1, 64),
        "num_decoder_layers": Whole(0, 64),
        "num_heads": Whole(1, 256),
        "relative_attention_num_buckets": Whole(1, 4096),
        "relative_attention_max_distance": Whole(1, 65536),
    },
    "vae": {
        "in_channels": Whole(1, 16),
        "out_channels": Whole(1, 16),
        "latent_channels": Whole(1, 256),
        "layers_per_block": Whole(1, 16),
        "norm_num_groups": Whole(1, 1024),
        "sample_size": Whole(1, 65536),
        "block_out_channels": Wholes(8, 1, 4096),
        "scaling_factor": Real(1e-4, 1e4),
        "shift_factor": Real(-1e4, 1e4),
    },
    "scheduler": {
        "num_train_timesteps": Whole(1, 100000),
        "base_image_seq_len": Whole(1, 1 << 20),
        "max_image_seq_len": Whole(1, 1 << 20),
        "shift": Real(1e-3, 1e3),
        "base_shift": Real(-1e3, 1e3),
        "max_shift": Real(-1e3, 1e3),
    },
    "metadata": {
        "text_length": Whole(1, 4096),
        "mask_id": Whole(0, 262143),
        "mask_embedding": Whole(1, 16384),  # its length: the T5 width
    },
}
DAMAGED = "the file is damaged or is not a model this pack reads; export, convert or download it again"


def _entry(where: Optional[str], key: str) -> str:
    return f"{where}.{key}" if where else key


def check_value(value, bound, path: str, name: str) -> None:
    """Raise CheckpointError(path) naming `name`, the value and the bound unless `value` keeps to `bound` (a Whole,
    Real or Wholes of `LIMITS`)."""
    if isinstance(bound, Wholes):
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= bound.most:
            raise CheckpointError(
                path,
                f"{name} is {_short(value)}, expected a list of 1 to {bound.most} whole numbers from {bound.low} to "
                f"{bound.high}; {DAMAGED}",
            )
        for i, item in enumerate(value):
            check_value(item, Whole(bound.low, bound.high), path, f"{name}[{i}]")
        return
    if isinstance(bound, Real):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not bound.low <= value <= bound.high:
            raise CheckpointError(
                path, f"{name} is {_short(value)}, expected a number from {bound.low:g} to {bound.high:g}; {DAMAGED}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(
            path, f"{name} is {_short(value)}, expected a whole number from {bound.low} to {bound.high}; {DAMAGED}"
        )
    if value > bound.high:
        raise CheckpointError(path, f"{name} is {value}, more than {bound.high}, the most this pack accepts; {DAMAGED}")
    if value < bound.low:
        raise CheckpointError(path, f"{name} is {value}, less than {bound.low}, the least this pack accepts; {DAMAGED}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_numbers(config: dict, table: str, path: str, where: Optional[str] = None) -> dict:
    """Check every entry of `config` that `LIMITS[table]` bounds (a None entry means "not set" and passes);
    `where` names the config inside the file (e.g. "model_config"). Returns `config`."""
    for key, bound in LIMITS[table].items():
        if key in config and config[key] is not None:
            check_value(config[key], bound, path, _entry(where, key))
    return config


def check_dict(value, path: str, where: str, what: str) -> dict:
    """`value` (a parsed config) must be a JSON object."""
    if not isinstance(value, dict):
        raise CheckpointError(path, f"{where} must be a JSON object of {what}, found a {_json_kind(value)}; {DAMAGED}")
    return value


def _json_kind(value) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_json(path: str, what: str) -> dict:
    """A config file's JSON object, or CheckpointError(path) saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"not a readable JSON config ({e}); {DAMAGED}") from None
    return check_dict(value, path, "the file", what)


def metadata_json(meta: dict, key: str, path: str, what: str) -> dict:
    """A single file's metadata entry that holds a JSON object (`what` says of what, for the error)."""
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(path, f"metadata {key} is not valid JSON ({e}); {DAMAGED}") from None
    return check_dict(value, path, f"metadata {key}", what)


def metadata_whole(meta: dict, key: str, path: str) -> int:
    """A single file's metadata entry that is one whole number, checked against `LIMITS["metadata"]`."""
    text, bound = meta[key], LIMITS["metadata"][key]
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(
            path, f"{key} is {_short(text)}, expected a whole number from {bound.low} to {bound.high}; {DAMAGED}"
        )
    digits = text.lstrip("0") or "0"
    if len(digits) > 18:  # never int() a huge digit string
        raise CheckpointError(
            path, f"{key} is {_short(text)}, more than {bound.high}, the most this pack accepts; {DAMAGED}"
        )
    value = int(digits)
    check_value(value, bound, path, key)
    return value


def check_known(config: dict, cls, what: str, path: str, where: Optional[str], skip_private: bool = False) -> None:
    """Every entry of `config` must be an argument of `cls` (entries starting with "_" pass when `skip_private`);
    else CheckpointError(path) naming the unknown ones and what `what` (the part) takes."""
    known = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(k for k in config if k not in known and not (skip_private and k.startswith("_")))
    if unknown:
        raise CheckpointError(
            path,
            f"unknown {what} config entries {unknown}" + (f" in {where}" if where else "") + f"; the {what} takes "
            f"{', '.join(known)}; {DAMAGED}",
        )


def transformer_config(raw, path: str, where: Optional[str] = None) -> dict:
    """Our transformer config from a file's: upstream `transformer/config.json` or our single file's model_config.

    Diffusers' bookkeeping entries are dropped, SD3.5 is refused, every entry must be one the transformer takes
    and every size keeps to `LIMITS["transformer"]`; nothing is built yet."""
    what = "the transformer's settings"
    config = {k: v for k, v in check_dict(raw, path, where or "the config", what).items() if k not in UPSTREAM_IGNORED}
    refuse_sd35(config, path)
    config.pop("dual_attention_layers", None)
    config.pop("qk_norm", None)
    if "vocab_size" not in config:
        raise CheckpointError(path, "config has no vocab_size: this is not a UniAlignment/DualDiffusion transformer")
    check_known(config, UniAlignTransformer, "transformer", path, where)
    check_numbers(config, "transformer", path, where)
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 64)
    check_value(
        heads * head_dim,
        LIMITS["transformer"]["inner_dim"],
        path,
        _entry(where, "num_attention_heads x attention_head_dim"),
    )
    if "caption_projection_dim" in config and config["caption_projection_dim"] != heads * head_dim:
        raise CheckpointError(
            path,
            f"{_entry(where, 'caption_projection_dim')} is {config['caption_projection_dim']}, but the blocks are "
            f"{heads} x {head_dim} = {heads * head_dim} wide and it must equal that; {DAMAGED}",
        )
    flag = config.get("fp16_time_projection", True)
    if not isinstance(flag, bool):
        raise CheckpointError(
            path, f"{_entry(where, 'fp16_time_projection')} is {_short(flag)}, expected true or false; {DAMAGED}"
        )
    return config


def check_scheduler(config, path: str, where: Optional[str] = None) -> dict:
    """A flow-matching scheduler config, checked at load (not at the first sampling): a JSON object whose numbers
    keep to `LIMITS["scheduler"]` and that gives finite noise levels for a short run."""
    config = check_dict(config, path, where or "the scheduler config", "the scheduler's settings")
    check_numbers(config, "scheduler", path, where)
    if config.get("use_dynamic_shifting") and config.get("base_image_seq_len", 256) == config.get(
        "max_image_seq_len", 4096
    ):
        raise CheckpointError(
            path,
            f"{_entry(where, 'base_image_seq_len')} equals max_image_seq_len with dynamic shifting on (the shift "
            f"would divide by zero); {DAMAGED}",
        )
    try:
        sigmas = flow_sigmas(config, 2, 256)
    except Exception as e:  # diffusers' own errors for values of the wrong kind
        raise CheckpointError(path, f"{where or 'the scheduler config'} is not usable: {e}; {DAMAGED}") from None
    if not bool(torch.isfinite(sigmas).all()):
        raise CheckpointError(
            path, f"{where or 'the scheduler config'} gives noise levels that are not finite; {DAMAGED}"
        )
    return config


def check_vae_config(config, path: str, where: Optional[str] = None) -> dict:
    """An AutoencoderKL config: a JSON object of the entries the VAE takes, with sizes in `LIMITS["vae"]`."""
    config = check_dict(config, path, where or "the VAE config", "the VAE's settings")
    check_known(config, AutoencoderKL, "VAE", path, where, skip_private=True)
    check_numbers(config, "vae", path, where)
    blocks = len(config.get("block_out_channels", [64]))
    for key in ("down_block_types", "up_block_types"):
        kinds = config.get(key)
        if kinds is None:
            continue
        if not isinstance(kinds, list) or len(kinds) != blocks or not all(isinstance(k, str) for k in kinds):
            raise CheckpointError(
                path,
                f"{_entry(where, key)} is {_short(kinds)}, expected a list of {blocks} block names (one per "
                f"block_out_channels entry); {DAMAGED}",
            )
    for key in ("latents_mean", "latents_std"):
        values = config.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) > LIMITS["vae"]["latent_channels"].high:
            raise CheckpointError(
                path, f"{_entry(where, key)} is {_short(values)}, expected a list of numbers; {DAMAGED}"
            )
        for i, v in enumerate(values):
            check_value(v, Real(-1e4, 1e4), path, f"{_entry(where, key)}[{i}]")
    return config


def check_t5_config(config, path: str, where: Optional[str] = None) -> dict:
    """A T5 encoder config (a JSON object, or a T5Config) with sizes in `LIMITS["text_encoder"]`."""
    values = (
        config.to_dict()
        if hasattr(config, "to_dict")
        else check_dict(config, path, where or "the T5 config", "T5's settings")
    )
    check_numbers(values, "text_encoder", path, where)
    heads, d_kv = values.get("num_heads", 8), values.get("d_kv", 64)
    check_value(heads * d_kv, LIMITS["text_encoder"]["d_model"], path, _entry(where, "num_heads x d_kv"))
    return config


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
    """A pipeline folder's `scheduler/scheduler_config.json` (checked), or SD3's default scheduler when it has none."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return dict(DEFAULT_SCHEDULER)
    return check_scheduler(read_json(path, "the scheduler's settings"), path)


def transformer_config_from_upstream(raw: dict, path: str) -> dict:
    """Turn an upstream `transformer/config.json` into our config (see `transformer_config`)."""
    return transformer_config(raw, path)


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
    try:
        with torch.device("meta"):
            model = UniAlignTransformer(**config)
    except Exception as e:  # diffusers' own checks on a config that passed ours
        raise CheckpointError(path, f"the transformer config is not usable: {e}") from None
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
    config = transformer_config(read_json(config_path, "the transformer's settings"), config_path)
    state = read_weights_folder(folder, "diffusion_pytorch_model")
    if fp16_time_projection is not None:
        config["fp16_time_projection"] = fp16_time_projection
    return build_transformer(config, state, folder, dtype, operations, weight_dtype)


def t5_config(raw, path: str, where: Optional[str] = None) -> T5Config:
    """A T5Config from a file's JSON object (a folder's config.json or a single file's text_encoder_config), its
    sizes checked first (`check_t5_config`)."""
    values = check_t5_config(raw, path, where)
    try:
        return T5Config(**values)
    except Exception as e:  # transformers' own checks, e.g. an unknown feed_forward_proj
        raise CheckpointError(path, f"{where or 'the T5 config'} is not a usable T5 config: {e}; {DAMAGED}") from None


def load_tokenizer(path: str):
    """A tokenizer from a folder, or a tokenizer.json file."""
    if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".json"))):
        raise CheckpointError(path, "not a tokenizer folder or tokenizer.json", component="tokenizer")
    try:
        if os.path.isdir(path):
            return AutoTokenizer.from_pretrained(path)
        return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    except Exception as e:  # tokenizers and transformers raise many kinds for a broken file
        raise CheckpointError(
            path, f"not a readable tokenizer ({type(e).__name__}: {_first_line(e)}); {DAMAGED}", component="tokenizer"
        ) from None


TOKENIZER_SPECIAL = ("eos_token", "pad_token", "unk_token")


def tokenizer_from_metadata(meta: dict, path: str):
    """The tokenizer a single file bundles: its `tokenizer` entry (tokenizer.json text) with the special tokens of
    `tokenizer_special`, each checked."""
    special = {}
    if "tokenizer_special" in meta:
        special = metadata_json(meta, "tokenizer_special", path, "special tokens")
        for key, token in special.items():
            if key not in TOKENIZER_SPECIAL or not isinstance(token, str):
                raise CheckpointError(
                    path,
                    f"metadata tokenizer_special has {key}: {_short(token)}; expected token strings for "
                    f"{', '.join(TOKENIZER_SPECIAL)} only; {DAMAGED}",
                    component="tokenizer",
                )
    try:
        backend = Tokenizer.from_str(meta["tokenizer"])
    except Exception as e:
        raise CheckpointError(
            path,
            f"metadata tokenizer is not a valid tokenizer.json ({_first_line(e)}); {DAMAGED}",
            component="tokenizer",
        ) from None
    for key, token in special.items():
        if backend.token_to_id(token) is None:
            raise CheckpointError(
                path,
                f"metadata tokenizer_special {key} {token!r} is not in the bundled tokenizer's vocabulary; {DAMAGED}",
                component="tokenizer",
            )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return _short(text[0]).strip("'\"") if text else type(error).__name__


def _find_mask_file(folder: str) -> Optional[str]:
    """The mask-token embedding in a model folder or its checkpoint/ subfolder: a .safetensors conversion first
    (it needs no unpickling), else the official .pth."""
    for pattern in ("mask_token_emb*.safetensors", "mask_token_emb*.pth"):
        for where in (folder, os.path.join(folder, "checkpoint")):
            found = sorted(glob.glob(os.path.join(where, pattern)))
            if found:
                return found[0]
    return None


def _first_dir(folder: str, names) -> Optional[str]:
    for name in names:
        if os.path.isdir(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _mask_id(tokenizer, declared: Optional[int] = None, path: str = "tokenizer") -> int:
    if declared is not None:
        return declared
    mask = tokenizer.convert_tokens_to_ids(T5_MASK_TOKEN)
    if mask is None or mask == tokenizer.unk_token_id:
        raise CheckpointError(
            path,
            f"the tokenizer has no {T5_MASK_TOKEN} token to use as the mask: UniAlignment needs the T5 tokenizer "
            "(or one that keeps its sentinel tokens)",
            component="tokenizer",
        )
    return mask


# ---- formats -----------------------------------------------------------------------------------------------------
# `load_model` finds the reader of a path in `READERS` (the first whose test passes), the way diffusers' single-file
# utilities infer a checkpoint's type before converting it; each reader returns `LoadedParts`, which `_assemble`
# completes with the components the caller gives.


class Components(NamedTuple):
    """A model's parts besides the transformer, each a path, a loaded object (module, tokenizer, tensor) or None."""

    text_encoder: Any = None
    vae: Any = None
    tokenizer: Any = None
    mask_embedding: Any = None

    def over(self, own: "Components") -> "Components":
        """These components where given, else `own`'s (the caller's choices win over the model's own)."""
        return Components(*(given or theirs for given, theirs in zip(self, own)))


class ReadOptions(NamedTuple):
    """How a reader builds the transformer (see `load_model`)."""

    dtype: torch.dtype = torch.float32
    fp16_time_projection: Optional[bool] = None
    operations: Any = None
    weight_dtype: Optional[torch.dtype] = None


class LoadedParts(NamedTuple):
    """What a format's reader found: the built transformer, the checked scheduler config, the model's own
    components, the mask id the file declares (None: the tokenizer's T5 mask token) and its prompt length."""

    transformer: UniAlignTransformer
    scheduler: dict
    components: Components = Components()
    mask_id: Optional[int] = None
    text_length: int = DEFAULT_TEXT_LENGTH


def _read_folder(path: str, options: ReadOptions) -> LoadedParts:
    """An upstream pipeline folder."""
    transformer_dir = _first_dir(path, ["transformer"])
    if transformer_dir is None:
        raise CheckpointError(path, "not a model folder: no transformer/ subfolder")
    fp16_time_projection = options.fp16_time_projection
    if fp16_time_projection is None:
        # DualDiffusion does not round the time projection; UniAlignment does.
        index_path = os.path.join(path, "model_index.json")
        if os.path.isfile(index_path):
            if "dual" in str(read_json(index_path, "the pipeline's parts").get("_class_name", "")).lower():
                fp16_time_projection = False
    scheduler = read_scheduler(path)  # checked before the transformer is built
    transformer = load_transformer(
        transformer_dir, options.dtype, fp16_time_projection, options.operations, options.weight_dtype
    )
    own = Components(
        text_encoder=_first_dir(path, ["text_encoder", "text_encoder_3"]),
        vae=_first_dir(path, ["vae"]),
        tokenizer=_first_dir(path, ["tokenizer", "tokenizer_3"]),
        mask_embedding=_find_mask_file(path),
    )
    return LoadedParts(transformer, scheduler, own)


def _read_file(path: str, options: ReadOptions) -> LoadedParts:
    """Our single-file format. Every metadata entry is read and checked before anything is built."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        hint = "a plain transformer or another model" if tensors else "an empty file"
        raise CheckpointError(
            path, f"not a UniAlignment single file (no format={FORMAT!r} metadata; looks like {hint})"
        )
    check_format_version(meta, path)
    missing = [k for k in ("model_config", "scheduler_config", "mask_id") if k not in meta]
    if missing:
        raise CheckpointError(path, f"damaged metadata header: no {', '.join(missing)}")
    config = transformer_config(
        metadata_json(meta, "model_config", path, "the transformer's settings"), path, "model_config"
    )
    scheduler = check_scheduler(
        metadata_json(meta, "scheduler_config", path, "the scheduler's settings"), path, "scheduler_config"
    )
    mask_id = metadata_whole(meta, "mask_id", path)
    if mask_id >= config["vocab_size"]:
        raise CheckpointError(
            path, f"mask_id is {mask_id}, but model_config.vocab_size is {config['vocab_size']}; {DAMAGED}"
        )
    text_length = DEFAULT_TEXT_LENGTH
    if "text_length" in meta:  # written by the trainer's export: its prompt length
        text_length = metadata_whole(meta, "text_length", path)
    t5 = vae = None
    if "text_encoder_config" in meta:
        t5 = t5_config(metadata_json(meta, "text_encoder_config", path, "T5's settings"), path, "text_encoder_config")
    if "vae_config" in meta:
        vae = check_vae_config(metadata_json(meta, "vae_config", path, "the VAE's settings"), path, "vae_config")
    if "tokenizer" in meta:
        tokenizer = tokenizer_from_metadata(meta, path)
    else:  # a tokenizer/ folder or a tokenizer.json beside the file
        folder = os.path.dirname(os.path.abspath(path))
        beside = os.path.join(folder, "tokenizer.json")
        tokenizer = _first_dir(folder, ["tokenizer"]) or (beside if os.path.isfile(beside) else None)
    mask_embedding = None
    if "mask_embedding" in meta:
        mask_embedding = decode_tensor(
            meta["mask_embedding"], path, "mask_embedding", LIMITS["metadata"]["mask_embedding"].high
        )
    if options.fp16_time_projection is not None:
        config["fp16_time_projection"] = options.fp16_time_projection
    transformer = build_transformer(config, tensors, path, options.dtype, options.operations, options.weight_dtype)
    text_encoder = bundled_vae = None
    if t5 is not None:
        t5_state = {k[len("text_encoder.") :]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
        text_encoder = t5_from_state_dict(t5_state, path, options.dtype, t5, options.operations)
    if vae is not None:
        vae_state = {k[len("vae.") :]: v for k, v in tensors.items() if k.startswith("vae.")}
        bundled_vae = vae_from_state_dict(vae_state, vae, path, vae_dtype(options.dtype))
    own = Components(text_encoder, bundled_vae, tokenizer, mask_embedding)
    return LoadedParts(transformer, scheduler, own, mask_id, text_length)


# (format, test of the path, reader): the first format whose test passes reads the path.
READERS: Tuple[Tuple[str, Callable[[str], bool], Callable[[str, ReadOptions], LoadedParts]], ...] = (
    ("pipeline folder", os.path.isdir, _read_folder),
    ("single file", os.path.isfile, _read_file),
)


def _reader_of(path: str):
    """The entry of `READERS` that reads `path`."""
    for entry in READERS:
        if entry[1](path):
            return entry
    raise CheckpointError(path, "model not found")


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
    _, _, read = _reader_of(path)
    loaded = read(path, ReadOptions(dtype, fp16_time_projection, operations, weight_dtype))
    given = Components(text_encoder, vae, tokenizer, mask_embedding)
    return _assemble(path, loaded, given, dtype, operations).to(device)


def _assemble(path: str, loaded: LoadedParts, given: Components, dtype, operations) -> UniAlignModel:
    """The UniAlignModel of a loaded transformer: T5, VAE and tokenizer (`given` wins over the model's own), the
    mask id and the mask-token embedding."""
    parts = given.over(loaded.components)
    t5 = parts.text_encoder
    if isinstance(t5, str):
        t5 = load_text_encoder(t5, dtype, operations)
    if t5 is None:
        raise CheckpointError(
            path,
            "no text encoder: pass a T5 encoder file (e.g. models/text_encoders/t5xxl_fp16.safetensors)",
            component="text_encoder",
        )
    vae_source = parts.vae
    autoencoder = load_vae(vae_source, vae_dtype(dtype)) if isinstance(vae_source, str) else vae_source
    if autoencoder is None:
        raise CheckpointError(
            path, "no VAE: pass an SD3 VAE file (e.g. models/vae/sd3_vae.safetensors)", component="vae"
        )
    transformer = loaded.transformer
    latent_channels = getattr(autoencoder.config, "latent_channels", None)
    if latent_channels is not None and latent_channels != transformer.config.in_channels:
        raise CheckpointError(
            vae_source if isinstance(vae_source, str) else path,
            f"the VAE makes {latent_channels}-channel latents, but the transformer takes "
            f"{transformer.config.in_channels} (in_channels): use the VAE the model was made with (SD3's)",
            component="vae",
        )
    tok = parts.tokenizer
    if tok is None:
        raise CheckpointError(
            path, "no tokenizer: put tokenizer/ next to the model or pass a tokenizer path", component="tokenizer"
        )
    tok_source = tok if isinstance(tok, str) else path
    if isinstance(tok, str):
        tok = load_tokenizer(tok)
    mask_id = _mask_id(tok, loaded.mask_id, tok_source)

    mask_source = parts.mask_embedding
    mask_vector = load_mask_embedding(mask_source) if isinstance(mask_source, str) else mask_source
    if mask_vector is not None:
        set_mask_embedding(t5, mask_vector, mask_id, mask_source if isinstance(mask_source, str) else path)
    return UniAlignModel(
        transformer,
        autoencoder,
        t5,
        tok,
        loaded.scheduler,
        mask_id,
        path,
        mask_vector,
        loaded.text_length,
    )


def sd3_transformer_config(raw: dict, vocab_size: int, fp16_time_projection: bool = False, path: str = "") -> dict:
    """Our transformer config from a diffusers SD3Transformer2DModel config (SD3-medium; SD3.5 is refused), its
    sizes checked (`transformer_config`)."""
    refuse_sd35(check_dict(raw, path, "the SD3 transformer config", "the transformer's settings"), path)
    missing = [k for k in SD3_CONFIG_KEYS if k not in raw]
    if missing:
        raise CheckpointError(path, f"SD3 transformer config lacks {missing}")
    config = {k: raw[k] for k in SD3_CONFIG_KEYS}
    config.update(vocab_size=vocab_size, fp16_time_projection=fp16_time_projection)
    return transformer_config(config, path)


class SD3Files(NamedTuple):
    """What an SD3-medium start provides: its transformer config and tensors (SD3's names), its scheduler config
    and the T5, VAE and tokenizer paths."""

    config: dict
    state: dict
    scheduler: dict
    components: Components


def _read_sd3(path: str, given: Components) -> SD3Files:
    """An SD3 pipeline folder, `transformer/` folder or transformer file; `given` (text_encoder, vae, tokenizer
    paths or None) wins over the folder's own."""
    folder = path if os.path.isdir(path) else None
    parts = given
    scheduler = dict(DEFAULT_SCHEDULER)
    if folder and os.path.isdir(os.path.join(folder, "transformer")):
        own = Components(
            text_encoder=_first_dir(folder, ("text_encoder_3",)),
            vae=_first_dir(folder, ("vae",)),
            tokenizer=_first_dir(folder, ("tokenizer_3", "tokenizer")),
        )
        parts = given.over(own)
        scheduler = read_scheduler(folder)
        folder = os.path.join(folder, "transformer")
    if folder:
        raw = read_json(os.path.join(folder, "config.json"), "the transformer's settings")
        state = read_weights_folder(folder, "diffusion_pytorch_model")
    else:
        state, meta = read_safetensors(path)
        sibling = os.path.join(os.path.dirname(path), "config.json")
        if "config" in meta:
            raw = metadata_json(meta, "config", path, "the transformer's settings")
        elif os.path.isfile(sibling):
            raw = read_json(sibling, "the transformer's settings")
        else:
            raise CheckpointError(path, "an SD3 transformer file needs its config.json beside it")
    missing = [n for n in ("text_encoder", "vae", "tokenizer") if getattr(parts, n) is None]
    if missing:
        raise CheckpointError(
            path,
            f"starting from SD3 needs {', '.join(missing)} (a training config's "
            f"{', '.join('init.' + m for m in missing)}), or an SD3 pipeline folder with "
            "text_encoder_3/, vae/, tokenizer_3/",
        )
    return SD3Files(raw, state, scheduler, parts)


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
    sd3 = _read_sd3(path, Components(text_encoder, vae, tokenizer))
    tok = load_tokenizer(sd3.components.tokenizer)
    tok.pad_token = tok.pad_token or tok.eos_token
    config = sd3_transformer_config(sd3.config, len(tok), bool(fp16_time_projection), path)
    transformer = UniAlignTransformer(**config, align_dim=align_dim)
    own = sd3.components._replace(tokenizer=tok, mask_embedding=None)
    loaded = LoadedParts(transformer, sd3.scheduler, own)
    model = _assemble(path, loaded, Components(mask_embedding=mask_embedding), torch.float32, None)
    return model, sd3.state
