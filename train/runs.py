"""Run folders and checkpoints: layout, atomic writes, finding `latest`, reading trained weights back.

    <run_dir>/config.yaml            the resolved config (absolute paths), written at the start
    <run_dir>/train.lock             held (fcntl) by the trainer that uses the folder; holds its PID and host
    <run_dir>/init_report.json       what the start weights mapped, added and dropped
    <run_dir>/metrics.jsonl          one line per optimizer step (losses, lr, grad norm, samples/s, batch indices)
    <run_dir>/logs/                  TensorBoard
    <run_dir>/validation/step_N/     validation images and captions
    <run_dir>/checkpoints/step_N/    trainable.safetensors (+ ema.safetensors), train_state.json, and the resume
                                     state: optimizer.safetensors, resume_state.json (LR schedule, grad scaler)
                                     and rng_<rank>.safetensors (random states, JSON in the metadata). No pickle:
                                     `--resume` refuses a folder that holds one. Written to a hidden temporary
                                     folder and renamed into place, so a checkpoint folder is always complete.

`trainable.safetensors` holds the trained tensors under the transformer's parameter names: every tensor of the
transformer for full fine-tuning, the LoRA matrices (peft names, `...lora_A.default.weight`) and the alignment
projectors for LoRA. Its metadata says which (`mode`, `lora_rank`, `lora_alpha`).
"""

import json
import os
import random
import re
import shlex
import shutil
import socket
import time
from typing import Dict, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from unialign_core.checkpoint import save_safetensors_atomic
from unialign_core.files import (
    fsync_dir,
    is_no_space,  # noqa: F401 - the trainer's name for the library's rule
    write_text_atomic,
)
from unialign_core.lora import LoraLayer, lora_key, merge_lora
from unialign_core.transformer import ALIGN_PREFIXES

from .config import load_config

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
    """Remove what a killed run left half-written: temporary checkpoint folders and the temporaries of the run
    folder's files (`.metrics.jsonl.<pid>.tmp`, `init_report.json.tmp`, ...). Call it holding the run's lock: then
    every temporary there is stale."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            path = os.path.join(run_dir, name)
            if name.endswith(".tmp") and os.path.isfile(path):
                os.remove(path)


def temporary_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f".tmp-step_{step:08d}")


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
    fsync_dir(os.path.dirname(final))


def prune(run_dir: str, keep: int):
    """Delete all but the newest `keep` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, obj):
    write_text_atomic(path, json.dumps(obj, indent=1))


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]):
    save_safetensors_atomic({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata)


def read_trainable(checkpoint: str, ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The trained tensors of a checkpoint (or its EMA copy) and the metadata of trainable.safetensors."""
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
        found = lora_key(key, adapter_names=True)
        if found is not None and found[1] != "alpha":
            parts.setdefault(found[0], {})[found[1]] = value
        else:
            rest[key] = value
    layers = {name: LoraLayer(p["down"], p["up"], float(alpha)) for name, p in sorted(parts.items())}
    return layers, rest


def apply_checkpoint(transformer, checkpoint: str, ema: bool = False, strict_projectors: bool = False) -> dict:
    """Load a checkpoint's trained weights into a plain (no peft) transformer; LoRA is merged with lora_deltas.

    Returns a small report. Projector tensors whose shape does not match are skipped unless strict.
    """
    tensors, meta = read_trainable(checkpoint, ema)
    own = transformer.state_dict()
    report = {"checkpoint": checkpoint, "mode": meta.get("mode", "full"), "loaded": 0, "skipped": []}
    if meta.get("mode") == "lora":
        layers, tensors = split_lora(tensors, float(meta["lora_alpha"]))
        merge_lora(transformer, layers, 1.0, checkpoint)
        report["lora_layers"] = len(layers)
    usable = {}
    for key, value in tensors.items():
        if key in own and own[key].shape == value.shape:
            usable[key] = value
        elif strict_projectors or not key.startswith(ALIGN_PREFIXES):
            raise ValueError(f"{checkpoint}: tensor {key} {tuple(value.shape)} does not fit this transformer")
        else:
            report["skipped"].append(key)
    transformer.load_state_dict(usable, strict=False)
    report["loaded"] = len(usable)
    return report


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_state(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, STATE))


def read_run_config(run_dir: str, overrides=()):
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
    write_text_atomic(path, "".join(kept))


# --------------------------------------------------------------------------------------------------------------
# Resume state without pickles: optimizer tensors in safetensors, everything else JSON.

OPTIMIZER = "optimizer.safetensors"
RESUME = "resume_state.json"
RNG = "rng_{rank}.safetensors"
# Files a checkpoint may hold are read only as safetensors or JSON; anything that looks like a pickle is refused.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".distcp")


class TrainingError(RuntimeError):
    """A run cannot go on (full disk, unsafe checkpoint); the message says why and what to do."""


class Interrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run after a step, with a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_command(run_dir: str) -> str:
    """The command that continues a run from its latest checkpoint (the run folder keeps its resolved config)."""
    return f"python -m train {shlex.quote(os.path.join(run_dir, 'config.yaml'))} --resume latest"


# --------------------------------------------------------------------------------------------------------------
# One trainer per run folder

LOCK = "train.lock"


class RunLock:
    """An exclusive lock (fcntl.flock) on `<run_dir>/train.lock`, which holds the PID and host of its trainer.

    A second trainer on the folder is refused with TrainingError. The kernel drops the lock of a process that dies,
    so a lock file left by a killed trainer is stale and simply taken over; `release()` removes the file."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None
        self.stale = None  # what a stale lock file said (a trainer that was killed), if there was one

    def acquire(self) -> "RunLock":
        try:
            import fcntl  # POSIX only
        except ImportError:  # no fcntl (Windows): no lock
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise TrainingError(
                    f"run_dir {os.path.dirname(self.path)} is in use by another trainer ({holder}; lock "
                    f"{self.path}); wait for it to finish, stop it, or give this run another run_dir"
                ) from None
            except OSError as e:
                os.close(fd)
                raise TrainingError(f"cannot lock {self.path} ({e}); the run folder's filesystem needs flock") from None
            try:  # the holder may have removed the file it released; then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            self.stale = os.read(fd, 200).decode("utf-8", "replace").strip() or None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(
                fd,
                f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            )
        except BaseException:
            self.release()
            raise
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # still holding it: a trainer waiting on the old file sees it replaced
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def remove_outputs(run_dir: str) -> list:
    """`--overwrite`: delete an earlier run's checkpoints, metrics, TensorBoard logs and validation outputs."""
    removed = []
    for name in (CHECKPOINTS, "metrics.jsonl", "logs", "validation"):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def _looks_like_pickle(path: str) -> bool:
    """By its name, or by its first bytes (a pickle saved under a checkpoint file's name is found too)."""
    if path.endswith(PICKLE_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if path.endswith(".safetensors") and len(head) == 9 and head[8:9] == b"{":
        return False  # a safetensors header: 8 bytes of length, then the JSON header
    # pickle protocol 2-5 starts with 0x80 and the protocol; torch.save's zip format with "PK"
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def refuse_pickles(checkpoint: str):
    """Raise TrainingError if a checkpoint folder holds a pickle (they are never loaded: they can run code)."""
    found = []
    for root, _, files in os.walk(checkpoint):
        for name in files:
            path = os.path.join(root, name)
            if _looks_like_pickle(path):
                found.append(os.path.relpath(path, checkpoint))
    if found:
        raise TrainingError(
            f"--resume {checkpoint}: refused, it holds pickle files ({', '.join(sorted(found)[:4])}); loading a "
            f"pickle can run any code, so the trainer never does. A checkpoint of this trainer is safetensors and "
            f"JSON only. To keep its weights, start a new run from it with init.path={checkpoint}"
        )


def jsonable(obj):
    """A state dict's JSON form (scheduler, grad scaler, optimizer scalars): keys as str, one-element tensors as
    numbers; raises TypeError on anything else."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise TypeError("tensor in a JSON part of the resume state")
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the resume state")


def optimizer_to_tensors(state: dict):
    """torch optimizer state_dict -> ({name: tensor}, metadata of str) for safetensors.

    The state is keyed by parameter index (torch's `optimizer.state_dict()`) or by parameter name (FSDP's gathered
    `get_optimizer_state_dict(..., full_state_dict=True)`); tensors are stored as `state.<key>.<name>`."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = jsonable(value)
    by_name = any(not isinstance(index, int) for index in state["state"]) or any(
        not isinstance(p, int) for g in state["param_groups"] for p in g["params"]
    )
    meta = {
        "format": "unialign-optimizer",
        "param_groups": json.dumps(jsonable(state["param_groups"])),
        "scalars": json.dumps(scalars),
        "keys": "name" if by_name else "index",
    }
    return tensors, meta


def optimizer_from_tensors(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> dict:
    key_of = str if meta.get("keys") == "name" else int
    state = {}
    for key, value in tensors.items():
        index, name = key[len("state.") :].rsplit(".", 1)  # optimizer state names (exp_avg, step) have no dot
        state.setdefault(key_of(index), {})[name] = value
    for index, values in json.loads(meta["scalars"]).items():
        state.setdefault(key_of(index), {}).update(values)
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_optimizer_state(path: str, state: dict):
    tensors, meta = optimizer_to_tensors(state)
    save_tensors(path, tensors, meta)


def save_optimizer(path: str, optimizer):
    save_optimizer_state(path, optimizer.state_dict())


def read_optimizer_state(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "unialign-optimizer":
        raise TrainingError(f"{path}: not an optimizer state written by this trainer")
    return optimizer_from_tensors(load_file(path), meta)


def load_optimizer(path: str, optimizer):
    optimizer.load_state_dict(read_optimizer_state(path))


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """This process's random states (Python, NumPy, torch CPU and CUDA) as tensors + JSON metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
    }
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]):
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(checkpoint: str, rank: int):
    tensors, meta = rng_state()
    save_tensors(os.path.join(checkpoint, RNG.format(rank=rank)), tensors, meta)


def load_rng(checkpoint: str, rank: int) -> bool:
    path = os.path.join(checkpoint, RNG.format(rank=rank))
    if not os.path.isfile(path):
        return False
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    set_rng_state(load_file(path), meta)
    return True
