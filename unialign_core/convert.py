"""Convert an upstream pipeline folder to our single-file format.

    python -m unialign_core.convert path/to/UniAlignment out/unialignment.safetensors [--dtype bf16]

The file holds the transformer, its config, the scheduler config, the mask id, the mask-token
embedding (when the folder has one or `--mask-embedding` is given) and the tokenizer. The T5
encoder and VAE stay separate (ComfyUI users already have them) unless `--bundle` is given.
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from .checkpoint import check_state_dict, read_weight_map
from .cli import ArgumentParser
from .errors import CheckpointError, InputError
from .loader import (
    DEFAULT_SCHEDULER,
    _find_mask_file,
    _first_dir,
    _mask_id,
    load_model,
    load_tokenizer,
    transformer_config_from_upstream,
)  # fmt: skip
from .model import DTYPES
from .single_file import (
    BUNDLE_PREFIXES,
    TORCH_DTYPES,
    StreamingSafetensorsWriter,
    _config_dict,
    save_model,
    single_file_metadata,
)
from .text_encoder import load_mask_embedding
from .transformer import ALIGN_PREFIXES, UniAlignTransformer

STEM = "diffusion_pytorch_model"


def transformer_shards(folder: str) -> List[Tuple[str, List[str]]]:
    """The safetensors files of a `transformer/` folder, each with the keys it holds (one file or a shard index)."""
    single = os.path.join(folder, f"{STEM}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="pt", device="cpu") as f:
                return [(single, list(f.keys()))]
        except Exception as e:
            raise CheckpointError(single, f"not a readable safetensors file: {e}") from None
    if os.path.isfile(index):
        shards: Dict[str, List[str]] = {}
        for key, shard in read_weight_map(index).items():
            shards.setdefault(shard, []).append(key)
        return [(os.path.join(folder, shard), keys) for shard, keys in sorted(shards.items())]
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(folder)):
        raise CheckpointError(folder, f"only pickle weights found; convert them to {STEM}.safetensors")
    raise CheckpointError(folder, f"no {STEM}.safetensors (or sharded index) in this folder")


def convert_folder_streaming(source: str, output: str, dtype: torch.dtype, mask_embedding=None) -> str:
    """Convert an upstream folder tensor by tensor: one shard is open at a time and one tensor is in memory.

    The T5 encoder and the VAE are not read at all. The file is the same as `save_single_file` writes for the
    loaded model (same tensors, same header)."""
    transformer_dir = _first_dir(source, ["transformer"])
    if transformer_dir is None:
        raise CheckpointError(source, "not a model folder: no transformer/ subfolder")
    config_path = os.path.join(transformer_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(transformer_dir, "no config.json in this transformer folder")
    with open(config_path) as f:
        config = transformer_config_from_upstream(json.load(f), config_path)
    index_path = os.path.join(source, "model_index.json")
    if os.path.isfile(index_path):  # DualDiffusion does not round the time projection; UniAlignment does
        with open(index_path) as f:
            if "dual" in json.load(f).get("_class_name", "").lower():
                config["fp16_time_projection"] = False
    with torch.device("meta"):
        model = UniAlignTransformer(**dict(config, align_dim=None))
    expected = {k: v.shape for k, v in model.state_dict().items()}

    shards = transformer_shards(transformer_dir)
    found, entries, plan = {}, [], []
    for shard, keys in shards:
        if not os.path.isfile(shard):
            raise CheckpointError(shard, "file not found (the shard index lists it)")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                present = set(f.keys())
                absent = [k for k in keys if k not in present]
                if absent:
                    raise CheckpointError(shard, f"the shard lacks keys the index lists: {absent[:5]}")
                for key in keys:
                    view = f.get_slice(key)
                    shape, kind = tuple(view.get_shape()), TORCH_DTYPES.get(view.get_dtype())
                    found[key] = torch.empty(shape, device="meta")
                    if key.startswith(ALIGN_PREFIXES + BUNDLE_PREFIXES) or key not in expected:
                        continue
                    if kind is None:
                        raise CheckpointError(shard, f"tensor {key!r} has the unsupported dtype {view.get_dtype()}")
                    entries.append((key, dtype if kind.is_floating_point else kind, shape))
                    plan.append((shard, key))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(shard, f"not a readable safetensors file: {e}") from None
    check_state_dict(transformer_dir, expected, found, ALIGN_PREFIXES + BUNDLE_PREFIXES, "UniAlignment transformer")

    scheduler = dict(DEFAULT_SCHEDULER)
    scheduler_path = os.path.join(source, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_path):
        with open(scheduler_path) as f:
            scheduler = json.load(f)
    tokenizer_dir = _first_dir(source, ["tokenizer", "tokenizer_3"])
    if tokenizer_dir is None:
        raise CheckpointError(source, "no tokenizer/ folder in this model folder")
    tokenizer = load_tokenizer(tokenizer_dir)
    mask_id = _mask_id(tokenizer)
    if not mask_id < config.get("vocab_size", 0):
        raise CheckpointError(source, f"mask id {mask_id} is outside the text head of {config.get('vocab_size')}")
    mask_source = mask_embedding or _find_mask_file(source)
    mask_vector = load_mask_embedding(mask_source) if mask_source else None
    metadata = single_file_metadata(_config_dict(model), scheduler, mask_id, mask_vector, tokenizer)

    with StreamingSafetensorsWriter(output, entries, metadata) as writer:
        for shard, _keys in shards:
            wanted = [key for s, key in plan if s == shard]
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in wanted:
                    tensor = f.get_tensor(key)
                    writer.write(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                    del tensor
    return output


# What `source` must be (the not-found message and --help): what the converter reads.
SOURCE_HELP = (
    "give the upstream pipeline folder as downloaded (glimmer16/UniAlignment): model_index.json, transformer/ "
    "(config.json and diffusion_pytorch_model*.safetensors, sharded with its index json or one file), tokenizer/, "
    "scheduler/, checkpoint/mask_token_emb*.pth if it has one (text_encoder/ and vae/ too with --bundle), "
    "or a single .safetensors file of ours"
)


def convert(source: str, output: str, dtype: str = "bf16", mask_embedding=None, bundle: bool = False) -> str:
    """Write `source` (any format load_model reads) as one single file.

    An upstream folder is converted tensor by tensor (`convert_folder_streaming`: never more than one shard's
    worth of memory, T5 and VAE untouched); `bundle`, or a source that is already a file, loads the model."""
    if not output.endswith(".safetensors"):
        raise InputError("output", f"path {output!r} must end with .safetensors", sep=" ")
    if os.path.isdir(source) and not bundle:
        return convert_folder_streaming(source, output, DTYPES[dtype], mask_embedding)
    if not os.path.exists(source):
        raise CheckpointError(source, f"model not found; {SOURCE_HELP}")
    return save_model(output, load_model(source, mask_embedding=mask_embedding), bundle=bundle, dtype=DTYPES[dtype])


def main(argv=None) -> int:
    parser = ArgumentParser(
        prog="python -m unialign_core.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        help="upstream pipeline folder (model_index.json, transformer/, tokenizer/, scheduler/, checkpoint/; "
        "text_encoder/ and vae/ for --bundle) or our single .safetensors file",
    )
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype in the file")
    parser.add_argument("--mask-embedding", help="the official mask_token_emb .pth, if the folder lacks it")
    parser.add_argument("--bundle", action="store_true", help="also store the T5 encoder and VAE (small models)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.output, args.dtype, args.mask_embedding, args.bundle)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
