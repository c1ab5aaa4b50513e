"""Tiny models for the tests, in every format users have.

The base is the golden checkpoint in `tests/data/golden/tiny_unialignment` (upstream folder layout,
tiny T5 with the real T5 tokenizer, tiny VAE), a copy of CI's `../shared/golden` kept in the repository so
that a fresh clone runs its tests (`tests/test_data_copies.py` checks the copies where `../shared` exists).
Treat `tests/data` as read-only: anything that changes files works on a copy.
"""

import functools
import json
import os
import shutil
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
GOLDEN = DATA / "golden" / "tiny_unialignment"
REFERENCE = DATA / "reference"
# Where the copies in tests/data came from (CI's read-only folder beside the repository), if present.
SHARED = Path(os.environ.get("UNIALIGN_SHARED", REPO.parent / "shared"))


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a read-only tree and make the copy writable."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            p = os.path.join(root, name)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)
    return dst


@functools.lru_cache(maxsize=None)
def golden_model():
    """The golden checkpoint loaded once through the normal loader (treat as read-only)."""
    from unialign_core import load_model

    return load_model(str(GOLDEN))


def golden_vectors():
    return load_file(str(GOLDEN / "vectors.safetensors"))


def golden_settings():
    with open(GOLDEN / "vectors.json") as f:
        return json.load(f)


def write_t5_file(path: Path, dtype: torch.dtype) -> Path:
    """The golden T5 as one ComfyUI-style file (HF key layout): fp16, or fp8 linears with the rest in fp16."""
    state = load_file(str(GOLDEN / "text_encoder" / "model.safetensors"))
    linear = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "SelfAttention.o.", "DenseReluDense.")
    out = {}
    for k, v in state.items():
        low_precision = dtype.is_floating_point and dtype.itemsize == 1 and any(p in k for p in linear)
        out[k] = v.to(dtype if low_precision else torch.float16)
    save_file(out, str(path))
    return path


def write_vae_file(path: Path) -> Path:
    """The golden VAE as one file, with its config in the metadata."""
    state = load_file(str(GOLDEN / "vae" / "diffusion_pytorch_model.safetensors"))
    config = (GOLDEN / "vae" / "config.json").read_text()
    save_file(state, str(path), metadata={"config": config})
    return path


def write_single_file(path: Path, **kwargs) -> Path:
    """The golden model converted to our single-file format (fp32)."""
    from unialign_core.convert import convert

    convert(str(GOLDEN), str(path), dtype="fp32", **kwargs)
    return path


def to_ldm_vae_keys(state: dict, num_up_blocks: int) -> dict:
    """Rename diffusers AutoencoderKL keys to the original (LDM) layout of SD3's single-file VAE."""
    import re

    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"conv_norm_out\.", "norm_out."),
        (r"conv_shortcut\.", "nin_shortcut."),
        (r"attn_1\.to_q\.", "attn_1.q."),
        (r"attn_1\.to_k\.", "attn_1.k."),
        (r"attn_1\.to_v\.", "attn_1.v."),
        (r"attn_1\.to_out\.0\.", "attn_1.proj_out."),
        (r"attn_1\.group_norm\.", "attn_1.norm."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        up = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", key)
        if up:
            kind = "block" if up.group(2) == "resnets" else "upsample"
            new = f"decoder.up.{num_up_blocks - 1 - int(up.group(1))}.{kind}.{up.group(3)}"
        for pattern, repl in renames:
            new = re.sub(pattern, repl, new)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]  # LDM stores the attention projections as 1x1 convs
        out["first_stage_model." + new] = value
    return out


def with_metadata(source: Path, target: Path, **changes) -> Path:
    """A copy of a single file with metadata entries replaced (str values as they are, others as JSON)."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    for key, value in changes.items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


def with_json_entry(source: Path, target: Path, key: str, **entries) -> Path:
    """A copy of a single file whose JSON metadata entry `key` has `entries` set (None removes one)."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        value = json.loads(f.metadata()[key])
    for name, entry in entries.items():
        if entry is None:
            value.pop(name, None)
        else:
            value[name] = entry
    return with_metadata(source, target, **{key: value})
