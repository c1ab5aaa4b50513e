"""Full-size rehearsal: random weights at the released sizes, in the layouts users download, then every step
timed with its peak memory, on the CPU (or a GPU).

    python -m tools.rehearse --out DIR [--keep] [--reuse] [--device cpu|cuda] [--steps convert,load,...]
                                     [--step-timeout S] [--rss-limit-gb G] [--size full|small]

1. Writes, tensor by tensor (never a whole model in memory, one fp32 tensor at most), under `DIR/files/`:
   * `UniAlignment/`: the upstream `glimmer16/UniAlignment` folder: `model_index.json`, `transformer/` (bf16,
     sharded with its index json; key names and shapes from the released key list
     `unialignment_sd3m_transformer_keys.tsv`, the training-only `siglip_adapter_*` included), `text_encoder/`
     (T5-XXL encoder in the Hugging Face layout, fp16, sharded, from the T5-XXL config), `vae/` (SD3's
     AutoencoderKL, fp16), `tokenizer/` (the T5 tokenizer), `scheduler/` and `checkpoint/mask_token_emb.00-of-01.pth`
     (a plain bf16 tensor);
   * `comfyui/text_encoders/t5xxl_fp16.safetensors` and `t5xxl_fp8_e4m3fn.safetensors` (ComfyUI's single T5 files:
     Hugging Face key names, fp8 linear weights with the embedding and norms in fp16) and `comfyui/vae/sd3_vae.safetensors`
     (the folder's VAE file, as the README tells users to rename it).
   The key lists come from `tests/data/reference` (or `../shared/reference`, or `--reference`).
2. Runs each step in its own process (so that no step's peak hides another's) and records its seconds and its peak
   resident set (`os.wait4`'s `ru_maxrss` of that process; `torch.cuda.max_memory_allocated` too on a GPU):
   `convert` (`python -m unialign_core.convert`'s code), `load` (`load_model` as the Loader node calls it: our single
   file in bf16, the fp8 T5, the VAE file), `t2i` (512x512, CFG 7 batched, 2 steps), `edit` (512 wide x 768 high,
   2 steps; also checks the position crop of a non-square latent), `caption` (256 tokens, 2 steps, each sampler;
   then the image-stream cache's logit drift: refresh every step vs every 2 and 4, along a 4-step trajectory),
   `fp8` (one velocity at 256 px with the block weights stored in bf16 and in fp8_e4m3fn: max abs difference) and
   `train` (one LoRA optimizer step with the four losses at 512 px, batch 1, gradient checkpointing:
   `tools/rehearse_train.py`).
3. Checks the bounds: conversion peak RSS <= the largest transformer shard + 2 GB; after loading, the weights held
   <= 10 GB with every T5 linear weight still fp8; no step above 16 GB. Writes `DIR/report.json` and `DIR/report.md`
   (a table), deletes `DIR/files` unless `--keep`, and exits 1 when a bound or a step failed.

A step that runs past `--step-timeout` (default 1500 s) or above `--rss-limit-gb` (default 18) is stopped and
recorded as such; the others still run. It takes about 33 GB of disk at full size (29 GB of files, then the
4.3 GB converted file).
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

GB = 1e9
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PACKAGE_DIR)
STEPS = ("convert", "load", "t2i", "edit", "caption", "fp8", "train")
TRANSFORMER_KEYS_TSV = "unialignment_sd3m_transformer_keys.tsv"
T5_CONFIG_JSON = "t5_v1_1_xxl_encoder_config.json"
# SD3-medium's transformer config plus the text head (the reference README's "Transformer" section).
UPSTREAM_TRANSFORMER_CONFIG = {
    "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.30.0", "attention_head_dim": 64,
    "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "sample_size": 128, "vocab_size": 32100,
}  # fmt: skip
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
                    "num_train_timesteps": 1000, "shift": 3.0}  # fmt: skip
MODEL_INDEX = {
    "_class_name": "UniAlignmentPipeline", "_diffusers_version": "0.30.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}  # fmt: skip
T5_LINEAR = ("SelfAttention.q.", "SelfAttention.k.", "SelfAttention.v.", "SelfAttention.o.", "DenseReluDense.")


@dataclass
class Spec:
    """What to write: the transformer's keys and shapes and the configs of the upstream folder."""

    transformer_keys: List[Tuple[str, Tuple[int, ...]]]
    transformer_config: dict  # upstream transformer/config.json
    t5_config: dict  # upstream text_encoder/config.json
    vae_config: dict  # upstream vae/config.json
    tokenizer_dir: str
    transformer_shard_bytes: int = int(2 * GB)
    t5_shard_bytes: int = int(5 * GB)  # Hugging Face's default shard size
    notes: Dict[str, str] = field(default_factory=dict)


def reference_dir(explicit: Optional[str] = None) -> str:
    candidates = (
        [explicit]
        if explicit
        else [
            os.path.join(REPO_DIR, "tests", "data", "reference"),
            os.path.join(os.path.dirname(REPO_DIR), "shared", "reference"),
        ]
    )
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, TRANSFORMER_KEYS_TSV)):
            return folder
    raise SystemExit(f"no {TRANSFORMER_KEYS_TSV} in {candidates}; pass --reference with the folder that has it")


def read_key_list(path: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """`key<TAB>shape[<TAB>note]` lines (shape `AxBxC`), `#` comments skipped."""
    keys = []
    with open(path) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            name, shape = line.rstrip("\n").split("\t")[:2]
            keys.append((name, tuple(int(n) for n in shape.split("x")) if shape else ()))
    return keys


def full_spec(reference: Optional[str] = None) -> Spec:
    from unialign_core.vae import SD3_VAE_CONFIG

    folder = reference_dir(reference)
    with open(os.path.join(folder, T5_CONFIG_JSON)) as f:
        t5_config = json.load(f)
    t5_config = dict(t5_config, architectures=["T5EncoderModel"], torch_dtype="float16")
    vae_config = dict(SD3_VAE_CONFIG, _class_name="AutoencoderKL", _diffusers_version="0.30.0")
    return Spec(
        read_key_list(os.path.join(folder, TRANSFORMER_KEYS_TSV)),
        dict(UPSTREAM_TRANSFORMER_CONFIG),
        t5_config,
        vae_config,
        os.path.join(folder, "t5_tokenizer"),
        notes={"keys": os.path.join(folder, TRANSFORMER_KEYS_TSV)},
    )


def small_spec(reference: Optional[str] = None) -> Spec:
    """The same layouts at a tiny size (for the tests): keys from a tiny transformer with its projectors."""
    from tools.random_models import random_transformer  # lazy, as every library import here: the parent stays light

    with torch.device("meta"):
        model = random_transformer(layers=2, heads=2, head_dim=8, joint_dim=32, pos_embed_max_size=64, sample_size=8,
                                   pooled_projection_dim=16, vocab=UPSTREAM_TRANSFORMER_CONFIG["vocab_size"],
                                   align_dim=24, align_hidden_dim=16)  # fmt: skip
    # the upstream config.json of that transformer
    config = {k: model.config[k] if not k.startswith("_") else v for k, v in UPSTREAM_TRANSFORMER_CONFIG.items()}
    keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    t5_config = {"d_ff": 64, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 32128,
                 "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "feed_forward_proj": "gated-gelu",
                 "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6, "model_type": "t5",
                 "is_encoder_decoder": False, "tie_word_embeddings": False, "architectures": ["T5EncoderModel"]}  # fmt: skip
    vae_config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
                  "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                  "block_out_channels": [32] * 4, "layers_per_block": 1, "norm_num_groups": 32,
                  "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                  "use_post_quant_conv": False}  # fmt: skip
    folder = reference_dir(reference)
    return Spec(
        keys,
        config,
        t5_config,
        vae_config,
        os.path.join(folder, "t5_tokenizer"),
        transformer_shard_bytes=40_000,
        t5_shard_bytes=1_500_000,
    )


# ---------------------------------------------------------------------------------------------------------------
# Writing


class RandomFill:
    """Random-looking weights at memory speed: slices of pools of normal numbers, one pool per (std, dtype).

    Norm weights are 1; matrices and convolutions have std 1/sqrt(fan-in), the rest std 0.02, so that activations
    stay finite through every block at full size. Values are made directly in the file's dtype (no fp32 copy of a
    large tensor): one copy pass per tensor."""

    def __init__(self, seed: int = 0, pool: int = 1 << 22):
        self.generator = torch.Generator().manual_seed(seed)
        self.base = torch.randn(pool, generator=self.generator)
        self.pools: Dict[Tuple[float, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        if len(shape) == 1 and name.endswith(".weight") and "norm" in name:
            return torch.ones(shape, dtype=dtype)
        std = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) in (2, 4) else 0.02
        pool = self.pools.get((std, dtype))
        if pool is None:
            pool = self.pools[(std, dtype)] = (self.base * std).to(dtype)
        out = torch.empty(n, dtype=dtype)
        done = 0
        while done < n:
            start = int(torch.randint(0, pool.numel(), (), generator=self.generator))
            take = min(n - done, pool.numel() - start)
            out[done : done + take] = pool[start : start + take]
            done += take
        return out.reshape(shape)


def _shard_plan(entries, limit: int) -> List[List[int]]:
    """Indices of `entries` per shard, in order, each shard at most `limit` bytes (or one tensor)."""
    shards, size = [[]], 0
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


class ShardedWriter:
    """A Hugging Face sharded folder (`<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json`),
    written tensor by tensor."""

    def __init__(self, folder: str, stem: str, entries, limit: int):
        from unialign_core.single_file import StreamingSafetensorsWriter

        self.folder, self.stem = folder, stem
        plan = _shard_plan(entries, limit)
        count = len(plan)
        self.names = [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        if count == 1:
            self.names = [f"{stem}.safetensors"]
        self.where = {}
        self.writers = []
        for shard, name in zip(plan, self.names):
            for i in shard:
                self.where[entries[i][0]] = len(self.writers)
            self.writers.append(
                StreamingSafetensorsWriter(os.path.join(folder, name), [entries[i] for i in shard], {"format": "pt"})
            )
        self.total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writers[self.where[name]].write(name, tensor)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {k: self.names[i] for k, i in self.where.items()},
            }
            _write_json(os.path.join(self.folder, f"{self.stem}.safetensors.index.json"), index)

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def _write_json(path: str, data: dict) -> None:
    from unialign_core.files import write_text_atomic  # lazy, as every library import here: the parent stays light

    write_text_atomic(path, json.dumps(data, indent=2))


def _stream(writers, entries_of, fill: RandomFill, keys, dtype: torch.dtype) -> None:
    """For each key: make its values once (in `dtype`), write them (cast per writer) into every writer that declares
    it."""
    try:
        for name, shape in keys:
            values = fill(name, shape, dtype)
            for writer, dtypes in zip(writers, entries_of):
                if name in dtypes:
                    writer.write(name, values.to(dtypes[name]))
            del values
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


def write_files(root: str, spec: Spec, seed: int = 0) -> Dict[str, str]:
    """Write the upstream folder and the ComfyUI files under `root`; returns their paths (also in paths.json)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from unialign_core.single_file import StreamingSafetensorsWriter

    fill = RandomFill(seed)
    up = os.path.join(root, "UniAlignment")
    comfy = os.path.join(root, "comfyui")
    paths = {
        "folder": up,
        "single_file": os.path.join(comfy, "unialignment", "unialignment.safetensors"),
        "t5_fp16": os.path.join(comfy, "text_encoders", "t5xxl_fp16.safetensors"),
        "t5_fp8": os.path.join(comfy, "text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
        "vae_file": os.path.join(comfy, "vae", "sd3_vae.safetensors"),
    }
    for p in paths.values():
        os.makedirs(p if p == up else os.path.dirname(p), exist_ok=True)
    _write_json(os.path.join(up, "model_index.json"), MODEL_INDEX)
    _write_json(os.path.join(up, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    shutil.copytree(spec.tokenizer_dir, os.path.join(up, "tokenizer"), dirs_exist_ok=True)

    # transformer/: bf16, sharded
    _write_json(os.path.join(up, "transformer", "config.json"), spec.transformer_config)
    entries = [(k, torch.bfloat16, shape) for k, shape in spec.transformer_keys]
    shards = ShardedWriter(
        os.path.join(up, "transformer"), "diffusion_pytorch_model", entries, spec.transformer_shard_bytes
    )
    _stream(
        [shards], [{k: torch.bfloat16 for k, _ in spec.transformer_keys}], fill, spec.transformer_keys, torch.bfloat16
    )
    paths["transformer_shards"] = [os.path.join(up, "transformer", n) for n in shards.names]

    # text_encoder/ (fp16, sharded) and ComfyUI's two single files, from the same values
    t5_config = {k: v for k, v in spec.t5_config.items() if not k.startswith("_")}
    _write_json(os.path.join(up, "text_encoder", "config.json"), spec.t5_config)
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**t5_config))
    t5_keys = [(k, tuple(v.shape)) for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"]
    fp8 = {k: (torch.float8_e4m3fn if k.endswith(".weight") and any(p in k for p in T5_LINEAR) else torch.float16)
           for k, _ in t5_keys}  # fmt: skip
    fp16 = {k: torch.float16 for k, _ in t5_keys}
    writers = [
        ShardedWriter(
            os.path.join(up, "text_encoder"), "model", [(k, torch.float16, s) for k, s in t5_keys], spec.t5_shard_bytes
        ),
        StreamingSafetensorsWriter(paths["t5_fp16"], [(k, torch.float16, s) for k, s in t5_keys]),
        StreamingSafetensorsWriter(paths["t5_fp8"], [(k, fp8[k], s) for k, s in t5_keys]),
    ]
    _stream(writers, [fp16, fp16, fp8], fill, t5_keys, torch.float16)

    # vae/ (fp16) and its file under ComfyUI's name
    vae_config = {k: v for k, v in spec.vae_config.items() if not k.startswith("_")}
    _write_json(os.path.join(up, "vae", "config.json"), spec.vae_config)
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
    vae_keys = [(k, tuple(v.shape)) for k, v in vae.state_dict().items()]
    half = {k: torch.float16 for k, _ in vae_keys}
    from unialign_core.vae import SD3_VAE_CONFIG

    # the single file is the folder's file renamed; a VAE other than SD3's (the small size) carries its config
    single_meta = None if vae_config == SD3_VAE_CONFIG else {"config": json.dumps(vae_config)}
    writers = [
        StreamingSafetensorsWriter(
            os.path.join(up, "vae", "diffusion_pytorch_model.safetensors"), [(k, torch.float16, s) for k, s in vae_keys]
        ),
        StreamingSafetensorsWriter(paths["vae_file"], [(k, torch.float16, s) for k, s in vae_keys], single_meta),
    ]
    _stream(writers, [half, half], fill, vae_keys, torch.float16)

    # checkpoint/mask_token_emb.00-of-01.pth: a plain tensor, as released
    mask = (torch.randn(t5_config["d_model"], generator=fill.generator) * 0.02).to(torch.bfloat16)
    os.makedirs(os.path.join(up, "checkpoint"), exist_ok=True)
    torch.save(mask, os.path.join(up, "checkpoint", "mask_token_emb.00-of-01.pth"))
    _write_json(os.path.join(root, "paths.json"), paths)
    return paths


def file_sizes(root: str) -> Dict[str, int]:
    sizes = {}
    for folder, _, names in os.walk(root):
        for name in names:
            p = os.path.join(folder, name)
            sizes[os.path.relpath(p, root)] = os.path.getsize(p)
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# Steps (each runs in a child process: python -m tools.rehearse --child STEP ...)


def weights_held(*modules) -> int:
    """Bytes of the distinct parameter and buffer tensors of the modules (what the loaded model holds)."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                total += t.nbytes
    return total


def t5_linear_dtypes(text_encoder) -> Dict[str, int]:
    """How many T5 linear weights (q, k, v, o, wi_0, wi_1, wo) are in each dtype."""
    counts: Dict[str, int] = {}
    for name, p in text_encoder.named_parameters():
        if name.endswith(".weight") and any(s in name + "." for s in T5_LINEAR):
            counts[str(p.dtype).replace("torch.", "")] = counts.get(str(p.dtype).replace("torch.", ""), 0) + 1
    return counts


def _status_bytes(field_name: str, pid="self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_for_modes(paths: dict, device: str):
    """The model as the Loader node loads it: our single file in bf16, the fp8 T5 and the VAE file."""
    from unialign_core.loader import load_model

    return load_model(
        paths["single_file"], text_encoder=paths["t5_fp8"], vae=paths["vae_file"], device=device, dtype=torch.bfloat16
    )


_PROGRESS = {"path": None, "start": time.perf_counter()}


def progress(label: str) -> None:
    """Note how far a step got (a JSON line beside its result), so that a step stopped for time still tells."""
    if _PROGRESS["path"]:
        with open(_PROGRESS["path"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "s": round(time.perf_counter() - _PROGRESS["start"], 1),
                        "at": label,
                        "rss_bytes": _status_bytes("VmRSS"),
                    }
                )
                + "\n"
            )


def read_progress(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class StepClock:
    """A mode's callback that records when each sampling step ended."""

    def __init__(self, label: str = "sampling"):
        self.start = time.perf_counter()
        self.marks = []
        self.label = label
        progress(f"{label}: started")

    def __call__(self, step, total, state=None):
        self.marks.append(round(time.perf_counter() - self.start, 2))
        progress(f"{self.label}: callback {step}/{total}")


def _image_check(images: torch.Tensor, width: int, height: int) -> dict:
    return {
        "shape": list(images.shape),
        "finite": bool(torch.isfinite(images).all()),
        "size_ok": tuple(images.shape[-2:]) == (height, width),
    }


def position_crop_check(transformer, width: int, height: int, vae_scale: int = 8) -> dict:
    """Is the position table cropped as the official SD3/UniAlignment code crops it, for a non-square image?

    Official: rows = latent height / p, cols = latent width / p, top = (max - rows) // 2, left = (max - cols) // 2,
    positions = table[top:top + rows, left:left + cols] (row-major over the image). Compared on zero latents, where
    the patch embedding gives only its bias plus the positions."""
    p = transformer.config.patch_size
    size = transformer.config.pos_embed_max_size
    rows, cols = height // vae_scale // p, width // vae_scale // p
    weight = transformer.pos_embed.proj.weight
    with torch.no_grad():
        tokens = transformer.embed_image(
            torch.zeros(1, transformer.config.in_channels, rows * p, cols * p, dtype=weight.dtype, device=weight.device)
        )
        table = transformer.pos_embed.pos_embed.reshape(1, size, size, -1)
        top, left = (size - rows) // 2, (size - cols) // 2
        official = table[:, top : top + rows, left : left + cols].reshape(1, rows * cols, -1)
        official = official + transformer.pos_embed.proj.bias
        swapped = table[:, left : left + cols, top : top + rows].reshape(1, rows * cols, -1)  # a transposed crop
        swapped = swapped + transformer.pos_embed.proj.bias
    diff = float((tokens.float() - official.float()).abs().max())
    return {
        "grid": [rows, cols],
        "top_left": [top, left],
        "max_abs_diff_vs_official": diff,
        "max_abs_diff_vs_transposed": float((tokens.float() - swapped.float()).abs().max()),
        "matches_official": diff == 0.0,
    }


def step_convert(paths, device) -> dict:
    from unialign_core.convert import convert

    started = time.perf_counter()
    convert(paths["folder"], paths["single_file"], "bf16")
    return {
        "run_s": time.perf_counter() - started,
        "largest_shard_bytes": max(map(os.path.getsize, paths["transformer_shards"])),
        "shards": len(paths["transformer_shards"]),
        "output_bytes": os.path.getsize(paths["single_file"]),
    }


def step_load(paths, device) -> dict:
    model = load_for_modes(paths, device)
    t5 = model.text_encoder
    transformer_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.transformer.parameters()})
    return {
        "weights_bytes": weights_held(model.transformer, model.text_encoder, model.vae),
        "transformer_bytes": weights_held(model.transformer),
        "t5_bytes": weights_held(t5),
        "vae_bytes": weights_held(model.vae),
        "rss_after_load_bytes": _status_bytes("VmRSS"),
        "t5_linear_weight_dtypes": t5_linear_dtypes(t5),
        "transformer_dtypes": transformer_dtypes,
        "vae_dtype": str(model.vae.dtype).replace("torch.", ""),
    }


def _timed_load(paths, device):
    started = time.perf_counter()
    model = load_for_modes(paths, device)
    progress("loaded")
    return model, time.perf_counter() - started


def step_t2i(paths, device) -> dict:
    from unialign_core.modes import text_to_image

    model, load_s = _timed_load(paths, device)
    clock = StepClock()
    out = text_to_image(
        model, "a red fox in the snow", width=512, height=512, steps=2, guidance=7.0, seed=1, callback=clock
    )
    return {
        "load_s": load_s,
        "run_s": time.perf_counter() - clock.start,
        "step_marks_s": clock.marks,
        **_image_check(out.images, 512, 512),
    }


def step_edit(paths, device) -> dict:
    from unialign_core.modes import edit

    model, load_s = _timed_load(paths, device)
    width, height = 512, 768
    crop = position_crop_check(model.transformer, width, height, model.vae_scale)
    source = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    clock = StepClock()
    out = edit(model, source, "make it night", steps=2, guidance=7.0, seed=1, callback=clock)
    return {
        "load_s": load_s,
        "run_s": time.perf_counter() - clock.start,
        "step_marks_s": clock.marks,
        "position_crop": crop,
        **_image_check(out.images, width, height),
    }


def step_caption(paths, device) -> dict:
    from unialign_core.modes import SAMPLERS, caption

    model, load_s = _timed_load(paths, device)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    details, total = {"load_s": load_s}, 0.0
    for sampler in SAMPLERS:
        clock = StepClock(sampler)
        text = caption(model, image, answer_tokens=256, steps=2, sampler=sampler, seed=0, callback=clock)
        seconds = time.perf_counter() - clock.start
        total += seconds
        details[sampler] = {"run_s": seconds, "step_marks_s": clock.marks, "characters": len(text[0])}
    details["run_s"] = total
    # issue 14's sanity check of the image-stream cache at full size: last-step logits of a full pass vs a
    # text-only pass on an image cache built `refresh` steps earlier, along the exact 4-step trajectory
    from tools.bench_understand import logit_drift
    from unialign_core.modes import understanding_input

    started = time.perf_counter()
    latents = model.encode_images(understanding_input(model, image).to(model.device))
    details["logit_drift"] = logit_drift(model, latents, 256, 4, (2, 4))
    details["logit_drift"]["run_s"] = time.perf_counter() - started
    progress("logit drift done")
    return details


def step_fp8(paths, device) -> dict:
    """One velocity (256 px, 128 text tokens) with the transformer's block weights stored in bf16, then in fp8."""
    from unialign_core.loader import load_model

    t = torch.tensor([500.0])
    details, velocities = {}, {}
    for name, stored in (("bf16", None), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        started = time.perf_counter()
        transformer = load_model(
            paths["single_file"],
            text_encoder=paths["t5_fp8"],
            vae=paths["vae_file"],
            device=device,
            dtype=torch.bfloat16,
            weight_dtype=stored,
        ).transformer
        g, config = torch.Generator().manual_seed(0), transformer.config
        x = torch.randn(1, config.in_channels, 32, 32, generator=g)
        context = torch.randn(1, 128, config.joint_attention_dim, generator=g)
        with torch.no_grad():
            out = transformer(x.to(device, torch.bfloat16), context.to(device, torch.bfloat16), t.to(device))
        velocities[name] = out.velocity.float().cpu()
        details[name] = {
            "seconds": time.perf_counter() - started,
            "transformer_bytes": weights_held(transformer),
            "stored_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in transformer.parameters()}),
        }
        del transformer, out
        progress(f"{name} velocity done")
    diff = (velocities["bf16"] - velocities["fp8_e4m3fn"]).abs()
    details["max_abs_velocity_diff"] = diff.max().item()
    details["mean_abs_velocity_diff"] = diff.mean().item()
    details["velocity_max_abs"] = velocities["bf16"].abs().max().item()
    details["velocity_mean_abs"] = velocities["bf16"].abs().mean().item()
    return details


CHILD_STEPS = {"convert": step_convert, "load": step_load, "t2i": step_t2i, "edit": step_edit,
               "caption": step_caption, "fp8": step_fp8}  # fmt: skip


def child_main(step: str, root: str, device: str, result: str) -> int:
    with open(os.path.join(root, "paths.json")) as f:
        paths = json.load(f)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _PROGRESS["path"] = result + ".progress"
    started = time.perf_counter()
    try:
        details = CHILD_STEPS[step](paths, device)
        ok, error = True, None
    except Exception as e:  # recorded in the report; the parent goes on with the next step
        import traceback

        traceback.print_exc()
        details, ok, error = {}, False, f"{type(e).__name__}: {e}"
    details["seconds"] = time.perf_counter() - started
    details["vmhwm_bytes"] = _status_bytes("VmHWM")
    if device == "cuda":
        details["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    _write_json(result, {"ok": ok, "error": error, "details": details})
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------------
# The parent: run each step in a child and watch it


def run_child(cmd: List[str], timeout: float, rss_limit: float) -> dict:
    """Run one step's process; returns its exit, seconds and peak RSS (its own `ru_maxrss` from `os.wait4`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_DIR, os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env)
    stopped, seen = None, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        seen = max(seen, _status_bytes("VmRSS", proc.pid))
        if stopped is None and seen > rss_limit:
            stopped = f"stopped: resident set {seen / GB:.1f} GB above the {rss_limit / GB:.0f} GB limit"
            proc.kill()
        elif stopped is None and time.monotonic() - started > timeout:
            stopped = f"stopped: still running after {timeout:.0f} s (--step-timeout)"
            proc.kill()
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit": proc.returncode,
        "wall_s": time.monotonic() - started,
        "stopped": stopped,
        "peak_rss_bytes": max(usage.ru_maxrss * 1024, seen),
    }


def run_steps(root: str, out: str, steps: Sequence[str], device: str, timeout: float, rss_limit: float) -> List[dict]:
    results = []
    for step in steps:
        result_path = os.path.join(out, f"step_{step}.json")
        for stale in (result_path, result_path + ".progress"):
            if os.path.exists(stale):
                os.remove(stale)
        if step == "train":
            module = ["tools.rehearse_train"]
        else:
            module = ["tools.rehearse", "--child", step]
        cmd = [sys.executable, "-m", *module, "--root", root, "--device", device, "--result", result_path]
        print(f"[rehearse] step {step} ...", flush=True)
        proc = run_child(cmd, timeout, rss_limit)
        entry = {"step": step, **proc}
        if os.path.exists(result_path):
            with open(result_path) as f:
                entry.update(json.load(f))
        else:
            entry.update({"ok": False, "error": proc["stopped"] or f"exited {proc['exit']} without a result"})
        entry["progress"] = read_progress(result_path + ".progress")
        results.append(entry)
        print(
            f"[rehearse] step {step}: ok={entry['ok']} {proc['wall_s']:.0f} s, peak RSS "
            f"{proc['peak_rss_bytes'] / GB:.2f} GB {entry.get('error') or ''}",
            flush=True,
        )
    return results


def check_bounds(results: List[dict]) -> List[dict]:
    by = {r["step"]: r for r in results}
    checks = []

    def add(name, value, bound, passed, note=""):
        checks.append({"check": name, "value": value, "bound": bound, "passed": bool(passed), "note": note})

    conv = by.get("convert")
    if conv and conv.get("ok"):
        bound = conv["details"]["largest_shard_bytes"] + 2 * GB
        add("convert: peak RSS <= largest shard + 2 GB", conv["peak_rss_bytes"], bound, conv["peak_rss_bytes"] <= bound)
    elif conv:
        add("convert: peak RSS <= largest shard + 2 GB", None, None, False, conv.get("error", ""))
    load = by.get("load")
    if load and load.get("ok"):
        d = load["details"]
        add(
            "load: weights held <= 10 GB (bf16 transformer, fp8 T5, VAE)",
            d["weights_bytes"],
            10 * GB,
            d["weights_bytes"] <= 10 * GB,
        )
        dtypes = d["t5_linear_weight_dtypes"]
        add(
            "load: every T5 linear weight still fp8",
            dtypes,
            "float8_e4m3fn only",
            set(dtypes) == {"float8_e4m3fn"} and sum(dtypes.values()) > 0,
        )
    elif load:
        add("load: weights held <= 10 GB", None, None, False, load.get("error", ""))
    edit_step = by.get("edit")
    if edit_step and edit_step.get("ok"):
        crop = edit_step["details"]["position_crop"]
        add(
            "edit: 512x768 position crop equals the official crop",
            crop["max_abs_diff_vs_official"],
            0.0,
            crop["matches_official"],
        )
    for r in results:
        if "peak_rss_bytes" in r:
            add(
                f"{r['step']}: peak RSS <= 16 GB",
                r["peak_rss_bytes"],
                16 * GB,
                r["peak_rss_bytes"] <= 16 * GB,
                "" if r.get("ok") else "step did not finish: " + str(r.get("error")),
            )
    return checks


def _gb(n) -> str:
    return "" if n is None else f"{n / GB:.2f}"


def markdown_table(report: dict) -> str:
    what = {
        "convert": "convert the upstream folder to our single file (streaming)",
        "load": "load single file bf16 + fp8 T5 + VAE file (the Loader's `load_model`)",
        "t2i": "text-to-image 512x512, CFG 7 batched, 2 steps",
        "edit": "edit 512x768, 2 steps",
        "caption": "caption, 256 tokens, 2 steps, `confidence` then `ddpm_cache`",
        "fp8": "one velocity at 256 px, block weights stored bf16 vs fp8_e4m3fn",
        "train": "one LoRA step, four losses, 512 px, batch 1, gradient checkpointing",
    }
    rows = ["| step | what | seconds (load + run) | peak RSS (GB) | result |", "|---|---|---|---|---|"]
    for r in report["steps"]:
        d = r.get("details", {})
        seconds = f"{r.get('wall_s', 0):.0f}"
        if "load_s" in d and "run_s" in d:
            seconds += f" ({d['load_s']:.0f} + {d['run_s']:.0f})"
        if r["step"] == "caption" and d.get("confidence"):
            seconds += f"; confidence {d['confidence']['run_s']:.0f}, ddpm_cache {d['ddpm_cache']['run_s']:.0f}"
        result = "ok" if r.get("ok") else (r.get("skipped") or r.get("error") or "failed")[:160]
        if r["step"] == "fp8" and "max_abs_velocity_diff" in d:
            result += (
                f"; max abs velocity diff {d['max_abs_velocity_diff']:.3g} (velocity max abs "
                f"{d['velocity_max_abs']:.3g}, mean abs diff {d['mean_abs_velocity_diff']:.3g})"
            )
        if r["step"] == "caption" and d.get("logit_drift"):
            result += "; logit drift " + ", ".join(
                f"{k}: max abs {v['max_abs_logit_diff']:.3g} of {v['logit_scale_max_abs']:.3g}"
                for k, v in d["logit_drift"].items()
                if k.startswith("refresh")
            )
        rows.append(
            f"| {r['step']} | {what.get(r['step'], '')} | {seconds} | {_gb(r.get('peak_rss_bytes'))} | {result} |"
        )
    rows += ["", "| bound | value | limit | passed |", "|---|---|---|---|"]
    for c in report["checks"]:
        value, bound = c["value"], c["bound"]
        fmt = (
            (lambda v: _gb(v) + " GB")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1e6
            else str
        )
        rows.append(
            f"| {c['check']} | {fmt(value)} | {fmt(bound) if not isinstance(bound, str) else bound} | "
            f"{'yes' if c['passed'] else 'NO'} |"
        )
    return "\n".join(rows) + "\n"


def build_parser(child: bool = False) -> argparse.ArgumentParser:
    """The command line; `child`: the hidden one of a step's own process (`--child STEP --root ... --result ...`)."""
    from unialign_core.cli import ArgumentParser

    head, _, rest = __doc__.partition("\n\n")
    parser = ArgumentParser(
        prog="python -m tools.rehearse",
        description=head,
        epilog=rest,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if child:
        parser.add_argument("--child", choices=sorted(CHILD_STEPS), required=True)
        parser.add_argument("--root", required=True)
        parser.add_argument("--result", required=True)
        parser.add_argument("--device", default="cpu")
        return parser
    parser.add_argument(
        "--out", required=True, help="folder for the files (DIR/files) and the report (DIR/report.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep DIR/files (default: delete them at the end)")
    parser.add_argument("--reuse", action="store_true", help="use DIR/files from an earlier --keep run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--size", choices=("full", "small"), default="full", help="small: the same layouts, tiny")
    parser.add_argument("--reference", help="folder with the key list, T5 config and tokenizer")
    parser.add_argument("--step-timeout", type=float, default=1500.0, help="seconds before a step is stopped")
    parser.add_argument("--rss-limit-gb", type=float, default=18.0, help="a step above this resident set is stopped")
    return parser


def reuse_problem(out: str) -> Optional[str]:
    """Why `--reuse` cannot use DIR/files (None: it can): an earlier `--keep` run leaves DIR/files/paths.json."""
    root = os.path.join(out, "files")
    if os.path.isfile(os.path.join(root, "paths.json")):
        return None
    found = "does not exist" if not os.path.isdir(root) else "has no paths.json (not a complete --keep run)"
    return (
        f"--reuse: nothing to reuse in {out}: it looked for {os.path.join(root, 'paths.json')}, the list an "
        f"earlier run with --keep writes last, and {root} {found}; run once with --out {out} --keep (it writes "
        "the files, about 33 GB at full size), or leave out --reuse to write them now"
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--child" in argv:
        args = build_parser(child=True).parse_args(argv)
        return child_main(args.child, args.root, args.device, args.result)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reuse and reuse_problem(args.out):
        parser.error(reuse_problem(args.out))
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
    if "convert" not in steps and not args.reuse:
        steps.insert(0, "convert")  # the later steps read the converted file
    os.makedirs(args.out, exist_ok=True)
    root = os.path.join(args.out, "files")
    spec = full_spec(args.reference) if args.size == "full" else small_spec(args.reference)
    report = {"size": args.size, "device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "nice": os.nice(0), "python": platform.python_version()}}  # fmt: skip
    try:
        if args.reuse and os.path.isfile(os.path.join(root, "paths.json")):
            report["write_s"] = None
        else:
            shutil.rmtree(root, ignore_errors=True)
            print(f"[rehearse] writing random {args.size}-size files under {root} ...", flush=True)
            started = time.perf_counter()
            write_files(root, spec)
            report["write_s"] = time.perf_counter() - started
            report["write_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(f"[rehearse] wrote them in {report['write_s']:.0f} s", flush=True)
        report["steps"] = run_steps(root, args.out, steps, args.device, args.step_timeout, args.rss_limit_gb * GB)
        report["files"] = file_sizes(root)
        report["disk_bytes"] = sum(report["files"].values())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report["checks"] = check_bounds(report["steps"])
    report["passed"] = all(c["passed"] for c in report["checks"]) and all(
        r.get("ok") or r.get("skipped") for r in report["steps"]
    )
    _write_json(os.path.join(args.out, "report.json"), report)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(markdown_table(report))
    print(markdown_table(report))
    print(f"[rehearse] report: {os.path.join(args.out, 'report.json')}; passed: {report['passed']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
