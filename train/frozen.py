"""Helpers for the frozen encoders (VAE, T5): their dtype and a cheap identity for feature-cache keys."""

import hashlib

import torch


def fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a frozen encoder for cache keys: names, shapes and a sample of every tensor."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
        h.update(str(float(flat.float().sum())).encode())
    return h.hexdigest()[:16]


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype):
    """Cast a frozen encoder's float tensors to `dtype`; fp8 weights (ComfyUI's fp8 T5) stay fp8."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype.itemsize > 1 and t.dtype != dtype:
            t.data = t.data.to(dtype)
    return module
