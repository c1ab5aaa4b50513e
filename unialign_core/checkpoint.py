"""Safe reading of weight files, with one clear error for every way a file can be wrong.

Only safetensors files and weights-only torch loads (on PyTorch 2.6 or newer) are ever read: no arbitrary pickle.
"""

import json
import os
import pickle
import re
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import write_atomic

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


# PyTorch before 2.6 lets a crafted file run code through `torch.load(weights_only=True)` (CVE-2025-32434), so .pth
# files are read only on 2.6 or newer.
MIN_TORCH_FOR_PTH = (2, 6)


def torch_version() -> Tuple[int, int]:
    """(major, minor) of the PyTorch that runs."""
    numbers = re.findall(r"\d+", str(torch.__version__))[:2]
    return tuple(int(n) for n in numbers) + (0,) * (2 - len(numbers))


def pth_to_safetensors(path: str, plain: bool = True) -> str:
    """How to turn a torch file holding one tensor into the .safetensors file this pack reads instead. `plain`: the
    file is a plain tensor file (PyTorch 2.6's weights-only load reads it); otherwise only the code that wrote it
    can, where the file is trusted."""
    name = os.path.basename(path)
    out = os.path.splitext(name)[0] + ".safetensors"
    save = f"save_file({{'mask_token_emb': t.reshape(-1).contiguous()}}, '{out}')"
    if plain:
        how = (
            f'convert it once to {out} with PyTorch 2.6 or newer: python -c "import torch; from safetensors.torch '
            f"import save_file; t = torch.load('{name}', map_location='cpu', weights_only=True); {save}\""
        )
    else:
        how = (
            f"if you trust where it came from, load it with the code that made it and save the tensor `t` with "
            f"safetensors (from safetensors.torch import save_file; {save})"
        )
    return (
        f"{how}, then use {out} instead (in a model folder it is found as mask_token_emb*.safetensors; "
        "`python -m unialign_core.convert ... --mask-embedding` takes it too)"
    )


def load_torch_tensor(path: str) -> torch.Tensor:
    """Load a single tensor from a .pth/.pt file with a weights-only, CPU load (PyTorch 2.6 or newer only)."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    if torch_version() < MIN_TORCH_FOR_PTH:
        raise CheckpointError(
            path,
            f"reading .pth files needs PyTorch {'.'.join(map(str, MIN_TORCH_FOR_PTH))} or newer (this is "
            f"{torch.__version__}): older versions' weights-only loading can be made to run code by a crafted file "
            f"(CVE-2025-32434). Upgrade PyTorch, or {pth_to_safetensors(path)}",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would advise weights_only=False: never pass that on
        raise CheckpointError(
            path,
            "not a plain tensor file: it is damaged or holds Python objects besides tensors, which this pack never "
            f"unpickles (unpickling can run code hidden in the file); {pth_to_safetensors(path, plain=False)}",
        ) from None
    except Exception as e:
        raise CheckpointError(
            path, f"not a readable torch tensor file ({type(e).__name__}; truncated, or another format?)"
        ) from None
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


def save_safetensors_atomic(
    tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None
) -> str:
    """Write a .safetensors file via a temp file and a rename (`files.write_atomic`): readers never see half a file,
    a full disk raises `NoSpaceError` and leaves the previous file intact.

    The file gets ordinary permissions (safetensors itself creates owner-only files), so a ComfyUI running as
    another user can read an exported model."""
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path
