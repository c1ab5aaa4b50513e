"""The attention kernel of a training step."""

import torch


def attention_backend(device: torch.device):
    """The attention kernel of a training step. On the CPU, PyTorch's flash-attention backward is several times
    slower than the plain matmul-softmax path at the short sequences of small models (measured in the shapes
    world: 51 ms of a 99 ms block step), so CPU steps use the math path; GPUs keep PyTorch's choice."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
