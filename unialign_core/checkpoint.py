"""Safe reading of weight files, with one clear error for every way a file can be wrong.

Only safetensors files and weights-only torch loads are ever read: no arbitrary pickle.
"""

import json
import os
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

SHOW = 5  # how many offending keys an error message quotes


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read every tensor and the metadata of one .safetensors file onto the CPU."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        size = os.path.getsize(path)
        raise CheckpointError(
            path, f"not a readable safetensors file ({size} bytes; truncated or another format?): {e}"
        ) from None
    return tensors, metadata


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """Read only the metadata header of a .safetensors file."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(path, f"not a readable safetensors file: {e}") from None


def read_weight_map(index: str) -> Dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a sharded checkpoint's ``*.index.json``."""
    try:
        with open(index) as f:
            return json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(index, f"not a valid shard index: {e}") from None


def read_weights_folder(folder: str, stem: str) -> Dict[str, torch.Tensor]:
    """Read `<stem>.safetensors` or a sharded `<stem>.safetensors.index.json` from a folder."""
    single = os.path.join(folder, f"{stem}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return read_safetensors(single)[0]
    if os.path.isfile(index):
        weight_map = read_weight_map(index)
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(os.path.join(folder, shard))[0])
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise CheckpointError(index, f"shards lack keys the index lists: {absent[:SHOW]}")
        return state
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(folder)):
        raise CheckpointError(folder, f"only pickle weights found; convert them to {stem}.safetensors")
    raise CheckpointError(folder, f"no {stem}.safetensors (or sharded index) in this folder")


def load_torch_tensor(path: str) -> torch.Tensor:
    """Load a single tensor from a .pth/.pt file with a weights-only, CPU load."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(path, f"not a weights-only torch file: {e}") from None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(path, f"expected one tensor, found {type(obj).__name__}")
    return obj


def check_state_dict(
    path: str,
    expected: Dict[str, torch.Size],
    found: Dict[str, torch.Tensor],
    ignore_prefixes: Iterable[str] = (),
    what: str = "weights",
) -> None:
    """Raise a CheckpointError naming missing/unexpected keys and wrong shapes."""
    ignore = tuple(ignore_prefixes)
    found_keys = {k for k in found if not k.startswith(ignore)}
    missing = sorted(k for k in expected if k not in found_keys)
    unexpected = sorted(k for k in found_keys if k not in expected)
    wrong = [
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(found_keys & set(expected))
        if tuple(found[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[:SHOW]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:SHOW]})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (first: {wrong[:SHOW]})")
    if problems:
        raise CheckpointError(path, f"does not match the {what}: " + "; ".join(problems))


def load_into(
    module: torch.nn.Module,
    state: Dict[str, torch.Tensor],
    path: str,
    what: str,
    dtype: Optional[torch.dtype] = None,
    ignore_prefixes: Iterable[str] = (),
) -> torch.nn.Module:
    """Check then load `state` into a module built on the meta device (tensors are assigned, not copied)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(path, expected, state, ignore_prefixes, what)
    state = {k: v for k, v in state.items() if k in expected}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _new_file_mode() -> int:
    """The permissions a plain new file gets here (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors_atomic(
    tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None
) -> str:
    """Write a .safetensors file via a temp file and a rename: readers never see half a file.

    The file gets ordinary permissions (safetensors itself creates owner-only files), so a ComfyUI running as
    another user can read an exported model."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
