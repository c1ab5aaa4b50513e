"""Exponential moving average of the trainable parameters."""

import torch

from .fsdp import is_dtensor


class EMA:
    """Exponential moving average of the trainable parameters (fp32 copies)."""

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self):
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self):
        """Full tensors. Under FSDP the shadows are sharded like their parameters (DTensors: each process keeps
        the average of its own shard, no communication per step); this gathers them (a collective)."""
        return {k: v.full_tensor() if is_dtensor(v) else v for k, v in self.shadow.items()}

    def load_state_dict(self, state):
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}")
        for k, v in self.shadow.items():
            if is_dtensor(v):
                from torch.distributed.tensor import distribute_tensor

                v.copy_(distribute_tensor(state[k].to(v.device, v.dtype), v.device_mesh, v.placements))
            else:
                v.copy_(state[k])
