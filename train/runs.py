"""Run folders and checkpoints: layout, atomic writes, finding `latest`, reading trained weights back.

    <run_dir>/config.yaml            the resolved config (absolute paths), written at the start
    <run_dir>/init_report.json       what the start weights mapped, added and dropped
    <run_dir>/metrics.jsonl          one line per optimizer step (losses, lr, grad norm, samples/s, batch indices)
    <run_dir>/logs/                  TensorBoard
    <run_dir>/validation/step_N/     validation images and captions
    <run_dir>/checkpoints/step_N/    trainable.safetensors (+ ema.safetensors), train_state.json and accelerate's
                                     optimizer / scheduler / RNG state. Written to a hidden temporary folder and
                                     renamed into place, so a checkpoint folder is always complete.

`trainable.safetensors` holds the trained tensors under the transformer's parameter names: every tensor of the
transformer for full fine-tuning, the LoRA matrices (peft names, `...lora_A.default.weight`) and the alignment
projectors for LoRA. Its metadata says which (`mode`, `lora_rank`, `lora_alpha`).
"""

import json
import os
import re
import shutil
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from unialign_core.lora import LoraLayer

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
STATE = "train_state.json"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step_{step:08d}")


def list_checkpoints(run_dir: str):
    """[(step, path)] of complete checkpoints, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isfile(os.path.join(path, STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINABLE)) and os.path.isfile(os.path.join(path, STATE))


def is_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, CHECKPOINTS))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder from a checkpoint folder or a run folder (its latest checkpoint)."""
    if is_checkpoint(path):
        return path
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
        raise FileNotFoundError(f"{path}: a run folder with no complete checkpoint yet")
    raise FileNotFoundError(f"{path}: neither a run folder nor a checkpoint folder")


def run_dir_of(checkpoint: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def clean_temporaries(run_dir: str):
    """Remove half-written checkpoints left by a killed run."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def temporary_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f".tmp-step_{step:08d}")


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str, final: str):
    """Rename a fully written temporary checkpoint into place (replacing an older one of the same step)."""
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(root, name), "rb+") as f:
                os.fsync(f.fileno())
    if os.path.exists(final):
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))


def prune(run_dir: str, keep: int):
    """Delete all but the newest `keep` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]):
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def read_trainable(checkpoint: str, ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The trained tensors of a checkpoint (or its EMA copy) and the metadata of trainable.safetensors."""
    from safetensors import safe_open

    with safe_open(os.path.join(checkpoint, TRAINABLE), framework="pt") as f:
        meta = f.metadata() or {}
    if ema:
        path = os.path.join(checkpoint, EMA)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint}: no EMA weights (the run had train.ema off)")
        return load_file(path), meta
    return load_file(os.path.join(checkpoint, TRAINABLE)), meta


def split_lora(tensors: Dict[str, torch.Tensor], alpha: float):
    """peft-named tensors -> ({module: LoraLayer}, other tensors)."""
    parts, rest = {}, {}
    for key, value in tensors.items():
        m = re.match(r"^(.*)\.lora_(A|B)(?:\.[^.]+)?\.weight$", key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            rest[key] = value
    layers = {name: LoraLayer(p["A"], p["B"], float(alpha)) for name, p in sorted(parts.items())}
    return layers, rest


def apply_checkpoint(transformer, checkpoint: str, ema: bool = False, strict_projectors: bool = False) -> dict:
    """Load a checkpoint's trained weights into a plain (no peft) transformer; LoRA is merged with lora_deltas.

    Returns a small report. Projector tensors whose shape does not match are skipped unless strict.
    """
    from unialign_core import lora_deltas

    tensors, meta = read_trainable(checkpoint, ema)
    own = transformer.state_dict()
    report = {"checkpoint": checkpoint, "mode": meta.get("mode", "full"), "loaded": 0, "skipped": []}
    if meta.get("mode") == "lora":
        layers, tensors = split_lora(tensors, float(meta["lora_alpha"]))
        with torch.no_grad():
            params = dict(transformer.named_parameters())
            for key, delta in lora_deltas(transformer, layers, 1.0, checkpoint).items():
                params[key].add_(delta.to(params[key].dtype))
        report["lora_layers"] = len(layers)
    usable = {}
    for key, value in tensors.items():
        if key in own and own[key].shape == value.shape:
            usable[key] = value
        elif strict_projectors or not key.startswith(("siglip_adapter_img.", "siglip_adapter_text.")):
            raise ValueError(f"{checkpoint}: tensor {key} {tuple(value.shape)} does not fit this transformer")
        else:
            report["skipped"].append(key)
    transformer.load_state_dict(usable, strict=False)
    report["loaded"] = len(usable)
    return report


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE), encoding="utf-8") as f:
        return json.load(f)


def read_run_config(run_dir: str, overrides=()):
    from .config import load_config

    return load_config(os.path.join(run_dir, "config.yaml"), overrides)


def truncate_metrics(run_dir: str, step: int):
    """Drop metric lines of steps after `step` (a killed run may have logged steps it never checkpointed)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError):
                continue  # a half-written last line
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
